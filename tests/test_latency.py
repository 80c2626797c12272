"""flextron.latency: the table's pricing of routings, static and per token."""

from __future__ import annotations

import pytest
import torch

from flextron.latency import LatencyTable, measure, uniform_mix
from flextron.model import ElasticConfig, ElasticLM


def table(mlp_mixed: float | None, attention_mixed: float | None) -> LatencyTable:
    return LatencyTable(
        "cpu", "synthetic", "float32", "prefill", 1, 16, 2,
        mlp_ms=[4.0, 2.0], attention_ms=[2.0, 1.0], fixed_ms=1.0,
        mlp_mixed_ms=mlp_mixed, attention_mixed_ms=attention_mixed,
    )  # fmt: skip


def probs(first: float) -> torch.Tensor:
    """Two layers, both with probability ``first`` of the widest choice."""
    return torch.tensor([[first, 1 - first]] * 2, requires_grad=True)


def test_static_routings_cost_the_probability_weighted_times():
    mlp, attention = probs(0.5), probs(1.0)
    expected = table(3.5, 2.5).expected_ms(mlp, attention)
    assert expected.item() == pytest.approx(1.0 + 2 * 3.0 + 2 * 2.0)


def test_a_mix_that_pays_costs_its_mean_plus_the_measured_overhead():
    # MLP: a uniform mix measured 3.5 ms against a static mean of 3 ms: 0.5 ms overhead.
    mlp, attention = probs(0.25), probs(1.0)
    expected = table(3.5, None).expected_ms(mlp, attention, per_token=True)
    assert expected.item() == pytest.approx(1.0 + 2 * (0.25 * 4 + 0.75 * 2 + 0.5) + 2 * 2.0)
    expected.backward()
    assert mlp.grad[0, 0] > mlp.grad[0, 1]  # the router still learns that narrower is faster


def test_a_mix_that_does_not_pay_costs_what_it_measured_whatever_the_probabilities():
    # Attention: the mix measured 2.1 ms, more than full width (2 ms): it runs masked.
    mlp, attention = probs(1.0), probs(0.1)
    expected = table(None, 2.1).expected_ms(mlp, attention, per_token=True)
    assert expected.item() == pytest.approx(1.0 + 2 * 4.0 + 2 * 2.1)
    expected.backward()
    assert torch.count_nonzero(attention.grad) == 0  # nothing to gain by routing it per token


def test_tables_without_mixed_times_price_as_before():
    mlp, attention = probs(0.5), probs(0.5)
    old = table(None, None)
    assert old.expected_ms(mlp, attention, per_token=True).item() == old.expected_ms(mlp, attention).item()


def test_measure_times_the_uniform_mixes():
    config = ElasticConfig(architecture="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=8, intermediate_size=64, mlp_widths=(64, 32),
                           head_counts=(4, 2))  # fmt: skip
    measured = measure(ElasticLM(config).eval(), seq_len=16, warmup=1, repeat=2, progress=False)
    assert measured.mlp_mixed_ms > 0 and measured.attention_mixed_ms > 0
    mix = uniform_mix(2, 5, 3, torch.device("cpu"))
    assert mix.shape == (2, 5) and torch.bincount(mix.flatten()).tolist() == [4, 3, 3]
