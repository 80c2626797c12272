"""The training report on the embedded real model (SmolLM2-135M, Shakespeare): held-out
perplexity per budget after conversion, after elastic continued training, and after router
training (with the routers' expected latency against the target on the measured latency
table). CPU-sized by default; writes JSON, a markdown table and a plot.

    python -m benchmarks.train_report --out runs/train-report [--elastic-steps 40 --router-steps 60]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from flextron import data
from flextron.conversion import ConvertOptions, convert
from flextron.outputs import atomic_write_json
from flextron.training import TrainConfig, Trainer, train


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/train-report"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--elastic-steps", type=int, default=40)
    parser.add_argument("--router-steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--budgets", default="1.0,0.75,0.5")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    args = parser.parse_args(argv)
    budgets = tuple(float(b) for b in args.budgets.split(","))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    train_texts, eval_texts = data.shakespeare("train"), data.shakespeare("eval")
    common = {
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "budgets": budgets,
        "eval_tokens": args.eval_tokens,
        "device": args.device,
        "warmup_steps": 5,
    }
    report: dict = {"device": args.device, "budgets": budgets, "stages": []}
    start = time.perf_counter()
    converted = convert(
        data.embedded_model_dir(),
        train_texts,
        out / "converted",
        ConvertOptions(max_tokens=8192, device=args.device),
    )
    before = Trainer(TrainConfig(**common), converted, train_texts, out / "before", eval_texts).evaluate()
    report["stages"].append({"stage": "converted", "train_tokens": 0, "budgets": before})

    elastic = TrainConfig(
        stage="elastic", steps=args.elastic_steps, lr=5e-5, p_full=0.25, loss="ce+kl", **common
    )
    result = train(elastic, converted, train_texts, out / "elastic", eval_texts)
    tokens = args.elastic_steps * args.batch_size * args.seq_len
    report["stages"].append(
        {
            "stage": "elastic",
            "train_tokens": tokens,
            "losses": result.losses,
            "budgets": result.evaluations[-1]["budgets"],
        }
    )

    # On this model the surrogate's running error settles around 0.1-0.2 within 150 steps
    # (losses span 5-10 nats across sub-networks): a 0.25 gate lets the routers learn.
    routers = TrainConfig(
        stage="routers", steps=args.router_steps, router_lr=3e-2, surrogate_threshold=0.25, **common
    )
    result = train(
        routers,
        out / "elastic" / f"checkpoint-{args.elastic_steps:06d}",
        train_texts,
        out / "routers",
        eval_texts,
    )
    report["stages"].append(
        {
            "stage": "routers",
            "train_tokens": 0,
            "router_steps": args.router_steps,
            "budgets": result.evaluations[-1]["budgets"],
        }
    )
    report["latency_table"] = json.loads((out / "routers" / "latency.json").read_text())
    report["seconds"] = time.perf_counter() - start
    atomic_write_json(out / "report.json", report)
    (out / "report.md").write_text(markdown(report))
    plot(report, out / "report.png")
    print(markdown(report))
    return out / "report.json"


def markdown(report: dict) -> str:
    lines = [
        "| stage | training tokens | " + " | ".join(f"budget {b:g}" for b in report["budgets"]) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in report["budgets"]) + " |",
    ]
    for stage in report["stages"]:
        cells = []
        for b in report["budgets"]:
            values = stage["budgets"][f"{b:g}"]
            cell = f"{values['perplexity']:.1f}"
            if "latency_ms" in values:
                cell += f" ({values['latency_ms']:.0f}/{values['latency_target_ms']:.0f} ms)"
            cells.append(cell)
        lines.append(f"| {stage['stage']} | {stage['train_tokens']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for stage in report["stages"]:
        values = [stage["budgets"][f"{b:g}"]["perplexity"] for b in report["budgets"]]
        ax.plot(report["budgets"], values, "o-", label=stage["stage"])
    ax.set_xlabel(
        "budget (uniform sub-networks: share of layer weights; routers: share of full latency)", fontsize=8
    )
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.set_title(f"SmolLM2-135M on Shakespeare, {report['device']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
