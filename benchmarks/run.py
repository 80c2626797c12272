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
from benchmarks.common import default_out_dir, save_bar_plots


def plot(json_paths: list[Path], out: Path) -> Path:
    panels = []
    for path in json_paths:
        data = json.loads(path.read_text())
        rows = data["rows"]
        labels = [
            f"{r.get('op', 'mlp').replace('nested_', '')}\n{r['shape']} T={r['tokens']}\n{r['mix']}"
            for r in rows
        ]
        series = {
            "ideal (FLOP share)": [r.get("ideal_fraction", r.get("mean_fraction")) for r in rows],
            "flextron": [r["fraction_of_dense"] for r in rows],
            "per-group torch loop": [r["loop_ms"] / r["dense_ms"] for r in rows],
        }
        panels.append((data, labels, series, "time / dense full-width time (lower is better)"))
    return save_bar_plots(panels, out)


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
