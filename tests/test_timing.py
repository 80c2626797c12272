"""flextron.timing: the one timer (interleaved samples, percentiles), and the benchmarks' modes."""

from __future__ import annotations

import pytest

from flextron.timing import Stats, Timer, stats_columns, summarize


def test_callables_are_timed_interleaved_after_their_warmup():
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    stats = Timer("cpu").measure(fns, repeat=4, warmup=2)
    assert calls == ["a", "a", "b", "b", "c", "c"] + ["a", "b", "c"] * 4
    assert set(stats) == {"a", "b", "c"} and all(s.n == 4 and s.peak_mib is None for s in stats.values())


def test_percentiles():
    stats = summarize([5.0, 1.0, 4.0, 2.0, 3.0, 6.0])
    assert stats.median == 3.5 and stats.n == 6
    assert stats.p20 == pytest.approx(2.0) and stats.p80 == pytest.approx(5.0)
    assert summarize([7.0]) == Stats(7.0, 7.0, 7.0, 1)


def test_result_columns():
    row = stats_columns({"ours": Stats(2.0, 1.0, 3.0, 5), "dense": Stats(4.0, 3.0, 5.0, 5, 12.5)})
    assert row == {
        "ours_ms": 2.0,
        "ours_p20_ms": 1.0,
        "ours_p80_ms": 3.0,
        "dense_ms": 4.0,
        "dense_p20_ms": 3.0,
        "dense_p80_ms": 5.0,
        "dense_peak_mib": 12.5,
    }


def test_benchmark_modes_time_forward_without_a_graph_backward_alone_and_full_steps():
    import torch

    from flextron.benchmarks.common import mode_ratios, time_modes

    weight = torch.randn(8, 4)
    x = torch.randn(3, 4)
    grad_modes: list[bool] = []

    def layer() -> torch.Tensor:
        grad_modes.append(torch.is_grad_enabled())
        return x @ weight.T

    stats = time_modes({"ours": layer, "base": layer}, [x, weight], "cpu", repeat=2)
    assert set(stats) == {"ours", "base", "ours_backward", "base_backward", "ours_full", "base_full"}
    assert not x.requires_grad and x.grad is None and weight.grad is None  # leaves restored
    ratios = mode_ratios(stats, "ours", "base", "fraction_of_dense")
    assert set(ratios) == {"backward_fraction_of_dense", "full_fraction_of_dense"}
    grad_modes.clear()
    assert set(time_modes({"ours": layer}, [x, weight], "cpu", repeat=2, modes=("forward",))) == {"ours"}
    assert grad_modes and not any(grad_modes)  # inference: no autograd graph
    grad_modes.clear()
    assert set(time_modes({"ours": layer}, [x, weight], "cpu", repeat=2, modes=("full",))) == {"ours_full"}
    assert grad_modes and all(grad_modes)
