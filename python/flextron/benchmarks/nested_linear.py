"""Nested GEMMs (nested_linear_n, nested_linear_k, nested_weight_grad) vs baselines measured in
the same run: the dense full-width matmul (cuBLAS / MKL), the per-group torch loop on weight
slices (reference.py), and on the GPU torch._grouped_mm over zero-padded weights.

Reports useful TFLOP/s (only the FLOPs of each token's width), the time as a fraction of the
dense time next to the FLOP-proportional ideal, and the speed-up over the per-group loop.
Each op is one kernel call, so there are no modes here: nested_linear_k and
nested_weight_grad are the two halves of nested_linear_n's backward (elastic_mlp times the
backward and full modes of the layer built from them).
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
    run_mlp_shape_sweep,
    time_all,
)
from flextron.conversion import default_mlp_widths
from flextron.timing import stats_columns


def grouped_mm_padded(x: torch.Tensor, padded_weights: torch.Tensor, offsets: torch.Tensor):
    # torch._grouped_mm computes every group at the full width (weights zero-padded).
    return torch._grouped_mm(x, padded_weights, offs=offsets[1:])


def padded_weights(w_up: torch.Tensor, widths: list[int]) -> torch.Tensor:
    """``[G, H, D]``: group g's weight prefix, transposed and zero-padded to the full width."""
    inner, hidden = w_up.shape
    padded = torch.zeros(len(widths), hidden, inner, dtype=w_up.dtype, device=w_up.device)
    for g, w in enumerate(widths):
        padded[g, :, :w] = w_up[:w].T
    return padded


def op_cases(x, w_up, h, w_down, dy, plan, widths: list[int]) -> dict:
    """Per op: (ours, the dense full-width GEMM, the per-group torch loop)."""
    return {
        "nested_linear_n": (
            lambda: flextron.nested_linear_n(x, w_up, plan.offsets, plan.widths),
            lambda: x @ w_up.T,
            lambda: reference.nested_linear_n(x, w_up, plan.offsets, widths),
        ),
        "nested_linear_k": (
            lambda: flextron.nested_linear_k(h, w_down, plan.offsets, plan.widths),
            lambda: h @ w_down.T,
            lambda: reference.nested_linear_k(h, w_down, plan.offsets, widths),
        ),
        "nested_weight_grad": (
            lambda: flextron.nested_weight_grad(dy, x, plan.offsets, plan.widths),
            lambda: dy.T @ x,
            lambda: reference.nested_weight_grad(dy, x, plan.offsets, widths),
        ),
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
    modes: tuple[str, ...],  # unused: one kernel per op (see the module docstring)
):
    widths = list(default_mlp_widths(inner))
    mix = MIXES[mix_name]
    plan = flextron.route_plan(choices_for_mix(tokens, mix, device), widths)
    counts = (plan.offsets[1:] - plan.offsets[:-1]).cpu().tolist()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype).to(device)
    w_up = (torch.randn(inner, hidden, generator=gen) / hidden**0.5).to(dtype).to(device)
    h = torch.randn(tokens, inner, generator=gen).to(dtype).to(device)
    w_down = (torch.randn(hidden, inner, generator=gen) / inner**0.5).to(dtype).to(device)
    dy = torch.randn(tokens, inner, generator=gen).to(dtype).to(device)
    useful = 2 * hidden * sum(c * w for c, w in zip(counts, widths, strict=True))
    ideal = mean_fraction(widths, mix)
    cases = op_cases(x, w_up, h, w_down, dy, plan, widths)
    padded = padded_weights(w_up, widths) if device == "cuda" and hasattr(torch, "_grouped_mm") else None
    for op, (ours, dense, loop) in cases.items():
        row = dict(
            op=op,
            shape=name,
            H=hidden,
            D=inner,
            tokens=tokens,
            mix=mix_name,
            dtype=str(dtype).split(".")[-1],
            widths=widths,
            ideal_fraction=round(ideal, 4),
        )
        stats = time_all({"ours": ours, "dense": dense, "loop": loop}, device, repeat)
        ours_ms, dense_ms, loop_ms = (stats[k].median for k in ("ours", "dense", "loop"))
        row.update(
            **stats_columns(stats),
            ours_tflops=useful / ours_ms / 1e9,
            dense_tflops=2 * tokens * hidden * inner / dense_ms / 1e9,
            fraction_of_dense=ours_ms / dense_ms,
            speedup_vs_loop=loop_ms / ours_ms,
        )
        if op == "nested_linear_n" and padded is not None:
            try:
                padded_stats = time_all(
                    {"grouped_mm_padded": lambda: grouped_mm_padded(x, padded, plan.offsets)}, device, repeat
                )
                row.update(stats_columns(padded_stats))
            except (RuntimeError, TypeError) as error:
                row["grouped_mm_padded_ms"] = f"unavailable: {str(error).splitlines()[0][:80]}"
        results.add(**row)


def run(options: BenchOptions) -> Path:
    return run_mlp_shape_sweep(
        "nested_linear",
        bench_case,
        [
            "op",
            "shape",
            "tokens",
            "mix",
            "ideal_fraction",
            "fraction_of_dense",
            "ours_tflops",
            "dense_tflops",
            "speedup_vs_loop",
        ],
        options,
    )
