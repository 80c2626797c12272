"""Run the kernel and layer benchmarks on one device, write their JSON under
runs/bench-<date>-<device>/ (or --out) and plots of time as a fraction of the dense baseline
next to the FLOP-proportional ideal."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_elastic_attention, bench_elastic_mlp, bench_nested_linear
from benchmarks.common import default_out_dir


def plot(json_paths: list[Path], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(json_paths), figsize=(7 * len(json_paths), 5), squeeze=False)
    for ax, path in zip(axes[0], json_paths, strict=True):
        data = json.loads(path.read_text())
        rows = data["rows"]
        labels = [
            f"{r.get('op', 'mlp').replace('nested_', '')}\n{r['shape']} T={r['tokens']}\n{r['mix']}"
            for r in rows
        ]
        ideal = [r.get("ideal_fraction", r.get("mean_fraction")) for r in rows]
        ours = [r["fraction_of_dense"] for r in rows]
        loop = [r["loop_ms"] / r["dense_ms"] for r in rows]
        xs = range(len(rows))
        ax.bar([x - 0.27 for x in xs], ideal, 0.27, label="ideal (FLOP share)")
        ax.bar(list(xs), ours, 0.27, label="flextron")
        ax.bar([x + 0.27 for x in xs], loop, 0.27, label="per-group torch loop")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xticks(list(xs), labels, fontsize=6, rotation=90)
        ax.set_ylabel("time / dense full-width time (lower is better)")
        ax.set_title(
            f"{data['benchmark']} on {data['device_name']}\n{data['date']}, torch {data['torch_version']}",
            fontsize=9,
        )
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/bench-<date>-<device>")
    parser.add_argument(
        "--suite",
        choices=("all", "kernels", "attention"),
        default="all",
        help="kernels: nested GEMMs and the elastic MLP; attention: the elastic attention layer",
    )
    args = parser.parse_args(argv)
    args.out = args.out or default_out_dir(args.device)
    common = ["--device", args.device, "--out", str(args.out)] + (["--quick"] if args.quick else [])
    if args.suite in ("all", "kernels"):
        paths = [bench_nested_linear.main(common), bench_elastic_mlp.main(common)]
        print(f"wrote {plot(paths, args.out / f'kernels-{args.device}.png')}")
    if args.suite in ("all", "attention"):
        bench_elastic_attention.main(common)


if __name__ == "__main__":
    main()
