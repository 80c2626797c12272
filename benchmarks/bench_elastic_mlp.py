"""Token-routed elastic MLP (flextron.elastic_mlp, SwiGLU) vs baselines measured in the same
run: the dense full-width MLP, and the per-group torch loop that slices the weights for each
width (reference.elastic_mlp). Also times the routing alone (route_plan + permute +
unpermute) as a share of the routed MLP.

At mean width fraction r the FLOP-proportional ideal is r x the dense MLP time.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import flextron
from benchmarks.common import (
    MIXES,
    Results,
    choices_for_mix,
    default_out_dir,
    mean_fraction,
    nested_widths,
    print_table,
    time_ms,
)
from flextron import reference

GPU_SHAPES = {"llama2-7b": (4096, 11008), "llama3-8b": (4096, 14336)}
GPU_TOKENS = (512, 4096, 16384)
CPU_SHAPES = {"smollm-135m": (576, 1536), "tinyllama-1b": (2048, 5632)}
CPU_TOKENS = (256, 1024)


def routing_only(x: torch.Tensor, choice: torch.Tensor, widths: list[int]) -> torch.Tensor:
    plan = flextron.route_plan(choice, widths)
    return flextron.unpermute(flextron.permute(x, plan), plan)


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
):
    widths = nested_widths(inner)
    mix = MIXES[mix_name]
    choice = choices_for_mix(tokens, mix, device)
    gen = torch.Generator().manual_seed(0)

    def weight(*shape):
        return (torch.randn(*shape, generator=gen) / shape[-1] ** 0.5).to(dtype).to(device)

    params = {"w_up": weight(inner, hidden), "w_gate": weight(inner, hidden), "w_down": weight(hidden, inner)}
    x = torch.randn(tokens, hidden, generator=gen).to(dtype).to(device)
    ratio = mean_fraction(widths, mix)
    ours_ms = time_ms(lambda: flextron.elastic_mlp(x, choice, widths=widths, **params), device, repeat=repeat)
    dense_ms = time_ms(lambda: reference.dense_mlp(x, **params), device, repeat=repeat)
    loop_ms = time_ms(
        lambda: reference.elastic_mlp(x, choice, widths=widths, **params), device, repeat=repeat
    )
    routing_ms = time_ms(lambda: routing_only(x, choice, widths), device, repeat=repeat)
    counts = torch.bincount(choice, minlength=len(widths)).tolist()
    useful = 3 * 2 * hidden * sum(c * w for c, w in zip(counts, widths, strict=True))
    results.add(
        shape=name,
        H=hidden,
        D=inner,
        tokens=tokens,
        mix=mix_name,
        dtype=str(dtype).split(".")[-1],
        widths=widths,
        mean_fraction=round(ratio, 4),
        ours_ms=ours_ms,
        dense_ms=dense_ms,
        loop_ms=loop_ms,
        routing_ms=routing_ms,
        ours_tflops=useful / ours_ms / 1e9,
        fraction_of_dense=ours_ms / dense_ms,
        vs_ideal=ours_ms / (ratio * dense_ms),
        speedup_vs_loop=loop_ms / ours_ms,
        routing_share=routing_ms / ours_ms,
    )


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/bench-<date>-<device>")
    args = parser.parse_args(argv)
    args.out = args.out or default_out_dir(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    shapes = GPU_SHAPES if args.device == "cuda" else CPU_SHAPES
    tokens_list = GPU_TOKENS if args.device == "cuda" else CPU_TOKENS
    if args.quick:
        shapes = dict(list(shapes.items())[:1])
        tokens_list = tokens_list[:2]
    repeat = 20 if args.device == "cuda" else (3 if args.quick else 5)
    results = Results("elastic_mlp", args.device)
    print(f"elastic MLP benchmark on {results.device_name}, {dtype}")
    for name, (hidden, inner) in shapes.items():
        for tokens in tokens_list:
            for mix_name in MIXES:
                bench_case(results, args.device, dtype, name, hidden, inner, tokens, mix_name, repeat)
    print_table(
        results.rows,
        [
            "shape",
            "tokens",
            "mix",
            "mean_fraction",
            "fraction_of_dense",
            "vs_ideal",
            "speedup_vs_loop",
            "routing_share",
        ],
    )
    path = results.write(args.out)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
