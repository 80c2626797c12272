"""Token-routed elastic MLP (flextron.elastic_mlp, SwiGLU) vs baselines measured in the same
run: the dense full-width MLP, and the per-group torch loop that slices the weights for each
width (reference.elastic_mlp); in the forward, backward and full (training step: forward +
backward to the input and the weights) modes. Also times the routing alone (route_plan + permute +
unpermute) as a share of the routed MLP.

At mean width fraction r the FLOP-proportional ideal is r x the dense MLP time.
"""

from __future__ import annotations

from pathlib import Path

import torch

import flextron
from flextron import reference
from flextron.benchmarks.common import (
    MIXES,
    BenchOptions,
    Results,
    choices_for_mix,
    mean_fraction,
    mode_ratios,
    run_mlp_shape_sweep,
    time_all,
    time_modes,
)
from flextron.conversion import default_mlp_widths
from flextron.timing import Stats, stats_columns


def routing_only(x: torch.Tensor, choice: torch.Tensor, widths: list[int]) -> torch.Tensor:
    plan = flextron.route_plan(choice, widths)
    return flextron.unpermute(flextron.permute(x, plan), plan)


def forward_ratios(stats: dict[str, Stats], useful_flops: float, ideal: float) -> dict[str, float]:
    ours_ms, dense_ms, loop_ms = (stats[k].median for k in ("ours", "dense", "loop"))
    return {
        "ours_tflops": useful_flops / ours_ms / 1e9,
        "fraction_of_dense": ours_ms / dense_ms,
        "vs_ideal": ours_ms / (ideal * dense_ms),
        "speedup_vs_loop": loop_ms / ours_ms,
        "routing_share": stats["routing"].median / ours_ms,
    }


def bench_case(
    results: Results,
    device: str,
    dtype,
    name: str,
    hidden: int,
    inner: int,
    tokens: int,
    mix_name: str,
    repeat: int,
    modes: tuple[str, ...],
):
    widths = list(default_mlp_widths(inner))
    mix = MIXES[mix_name]
    choice = choices_for_mix(tokens, mix, device)
    gen = torch.Generator().manual_seed(0)

    def weight(*shape):
        return (torch.randn(*shape, generator=gen) / shape[-1] ** 0.5).to(dtype).to(device)

    params = {"w_up": weight(inner, hidden), "w_gate": weight(inner, hidden), "w_down": weight(hidden, inner)}
    x = torch.randn(tokens, hidden, generator=gen).to(dtype).to(device)
    ratio = mean_fraction(widths, mix)
    stats = time_modes(
        {
            "ours": lambda: flextron.elastic_mlp(x, choice, widths=widths, **params),
            "dense": lambda: reference.dense_mlp(x, **params),
            "loop": lambda: reference.elastic_mlp(x, choice, widths=widths, **params),
        },
        [x, *params.values()],
        device,
        repeat,
        modes,
    )
    forward = {}
    if "forward" in modes:
        stats |= time_all({"routing": lambda: routing_only(x, choice, widths)}, device, repeat)
        counts = torch.bincount(choice, minlength=len(widths)).tolist()
        useful = 3 * 2 * hidden * sum(c * w for c, w in zip(counts, widths, strict=True))
        forward = forward_ratios(stats, useful, ratio)
    results.add(
        shape=name,
        H=hidden,
        D=inner,
        tokens=tokens,
        mix=mix_name,
        dtype=str(dtype).split(".")[-1],
        widths=widths,
        mean_fraction=round(ratio, 4),
        **stats_columns(stats),
        **forward,
        **mode_ratios(stats, "ours", "dense", "fraction_of_dense"),
        **mode_ratios(stats, "loop", "ours", "speedup_vs_loop"),
    )


def run(options: BenchOptions) -> Path:
    return run_mlp_shape_sweep(
        "elastic_mlp",
        bench_case,
        [
            "shape",
            "tokens",
            "mix",
            "mean_fraction",
            "fraction_of_dense",
            "vs_ideal",
            "speedup_vs_loop",
            "routing_share",
            "backward_fraction_of_dense",
            "full_fraction_of_dense",
            "full_speedup_vs_loop",
        ],
        options,
    )
