"""The benchmark suites behind ``flextron bench``: run them on one device, write each one's
JSON (rewritten after every row) and plots, and summarize the ratios against the baselines
measured in the same run."""

from __future__ import annotations

import json
import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from flextron.benchmarks import elastic_attention, elastic_mlp, elastic_model, nested_linear, token_routing
from flextron.benchmarks.common import BenchOptions, save_bar_plots

# A suite is one benchmark: its module, its --suite name and its result files' stem
# (<suite>-<device>.json and .png) are the same word.
Suite = Literal["nested_linear", "elastic_mlp", "elastic_attention", "elastic_model", "token_routing"]
SUITES: tuple[str, ...] = get_args(Suite)
# The names before 0.2, accepted for one release with a warning.
DEPRECATED_SUITES = {
    "kernels": ("nested_linear", "elastic_mlp"),
    "attention": ("elastic_attention",),
    "model": ("elastic_model",),
}


@dataclass
class BenchReport:
    results: list[Path] = field(default_factory=list)  # one JSON per suite
    plots: list[Path] = field(default_factory=list)  # one plot per suite
    summary: list[dict] = field(default_factory=list)  # one row per suite (median ratios)


def resolve_suites(
    suites: Sequence[str], notify: Callable[[str, tuple[str, ...]], None] | None = None
) -> tuple[str, ...]:
    """``suites`` with the deprecated group names expanded, in run order. Each deprecated
    name is reported to ``notify(name, replacement)`` (the CLI's one-line notice), else as
    a FutureWarning."""
    named: list[str] = []
    for suite in suites:
        if suite in DEPRECATED_SUITES:
            replacement = DEPRECATED_SUITES[suite]
            if notify is not None:
                notify(suite, replacement)
            else:
                warnings.warn(
                    f"benchmark suite {suite!r} is deprecated: use {', '.join(replacement)}",
                    FutureWarning,
                    stacklevel=3,
                )
            named += replacement
        else:
            named.append(suite)
    unknown = sorted(set(named) - set(SUITES))
    if unknown or not named:
        raise ValueError(f"benchmark suites are {list(SUITES)}, got {list(suites)}")
    return tuple(s for s in SUITES if s in named)


def run(suites: Sequence[str], options: BenchOptions) -> BenchReport:
    report = BenchReport()
    for suite in resolve_suites(suites):
        module, plot = _SUITES[suite]
        path = module.run(options)
        report.results.append(path)
        report.plots.append(plot(path, path.with_suffix(".png")))
    report.summary = [summarize(json.loads(p.read_text())) for p in report.results]
    print("\n" + format_summary(report.summary))
    return report


def summarize(data: dict) -> dict:
    """Median ratios of one benchmark's rows (time / baseline time: lower is better)."""

    def median(key: str) -> float | None:
        values = [r[key] for r in data["rows"] if isinstance(r.get(key), float | int)]
        return statistics.median(values) if values else None

    return {
        "benchmark": data["benchmark"],
        "device": data["device_name"],
        "rows": len(data["rows"]),
        "time_vs_dense": median("fraction_of_dense") or median("fraction_of_full"),
        "ideal": median("ideal_fraction") or median("mean_fraction"),
        "time_vs_ideal": median("vs_ideal"),
        "speedup_vs_loop": median("speedup_vs_loop"),
        "time_vs_static_sliced": median("vs_sliced") or median("vs_transformers"),
        "full_time_vs_dense": median("full_fraction_of_dense") or median("full_fraction_of_full"),
        "routing_share": median("routing_share"),
    }


def format_summary(rows: list[dict]) -> str:
    columns = [
        ("benchmark", "benchmark"),
        ("rows", "rows"),
        ("time_vs_dense", "time / dense (full width)"),
        ("ideal", "FLOP-proportional ideal"),
        ("time_vs_ideal", "time / ideal"),
        ("speedup_vs_loop", "speed-up vs per-group torch loop"),
        ("time_vs_static_sliced", "time / plain torch model of that size"),
        ("full_time_vs_dense", "training step / dense"),
        ("routing_share", "routing share"),
    ]
    device = rows[0]["device"] if rows else "?"
    lines = [
        f"Medians over each benchmark's rows on {device} (all measured in this run):",
        "| " + " | ".join(title for _, title in columns) + " |",
        "| --- |" + " ---: |" * (len(columns) - 1),
    ]
    for row in rows:
        cells = [row[key] for key, _ in columns]
        lines.append("| " + " | ".join(_cell(v) for v in cells) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _plot_kernel(json_path: Path, out: Path) -> Path:
    data = json.loads(json_path.read_text())
    rows = data["rows"]
    labels = [
        f"{r.get('op', 'mlp').replace('nested_', '')}\n{r['shape']} T={r['tokens']}\n{r['mix']}" for r in rows
    ]
    series = {
        "ideal (FLOP share)": [r.get("ideal_fraction", r.get("mean_fraction")) for r in rows],
        "flextron": [r["fraction_of_dense"] for r in rows],
        "per-group torch loop": [r["loop_ms"] / r["dense_ms"] for r in rows],
    }
    return save_bar_plots([(data, labels, series, "time / dense full-width time (lower is better)")], out)


def _plot_model(json_path: Path, out: Path) -> Path:
    data = json.loads(json_path.read_text())
    rows = data["rows"]
    labels = [f"{r['shape']} T={r['tokens']}\n{r['case']}" for r in rows]
    series = {
        "ideal (FLOP share)": [r["ideal_fraction"] for r in rows],
        "flextron": [r["fraction_of_full"] for r in rows],
        "transformers, same size": [
            r["transformers_ms"] / (r["ours_ms"] / r["fraction_of_full"]) if r["transformers_ms"] else 0.0
            for r in rows
        ],
    }
    return save_bar_plots([(data, labels, series, "time / flextron full-width time (lower is better)")], out)


def _plot_attention(json_path: Path, out: Path) -> Path:
    data = json.loads(json_path.read_text())
    rows = data["rows"]
    labels = [f"{r['phase']} {r['shape']} T={r['tokens']}\n{r['case']} [{r['backend']}]" for r in rows]
    series = {
        "ideal (FLOP share)": [r["ideal_fraction"] for r in rows],
        "flextron": [r["fraction_of_dense"] for r in rows],
    }
    return save_bar_plots(
        [(data, labels, series, "time / dense full-width attention time (lower is better)")], out
    )


def _plot_token_routing(json_path: Path, out: Path) -> Path:
    """Per token count: each case's time over full width next to its FLOP ideal, and where
    the time goes (stacked, per call, scaled to the measured time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flextron.benchmarks.breakdown import KINDS

    data = json.loads(json_path.read_text())
    rows = data["rows"]
    labels = [f"{r['phase']} B={r['batch']} T={r['tokens']}\n{r['case']}" for r in rows]
    xs = range(len(rows))
    fig, (ratio_ax, time_ax) = plt.subplots(2, 1, figsize=(max(8, 0.45 * len(rows)), 9), sharex=True)
    ratio_ax.bar([x - 0.2 for x in xs], [r["ideal_fraction"] for r in rows], 0.4, label="ideal (FLOP share)")
    ratio_ax.bar([x + 0.2 for x in xs], [r["fraction_of_full"] for r in rows], 0.4, label="flextron")
    ratio_ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ratio_ax.set_ylabel("time / full width (lower is better)")
    ratio_ax.legend(fontsize=8)
    ratio_ax.set_title(
        f"token_routing on {data['device_name']}\n{data['date']}, torch {data['torch_version']}", fontsize=9
    )
    bottom = [0.0] * len(rows)
    for kind in KINDS:
        per_call = [_kind_ms(r, kind) / r["ours_ms"] for r in rows]
        time_ax.bar(xs, per_call, 0.6, bottom=bottom, label=kind)
        bottom = [b + v for b, v in zip(bottom, per_call, strict=True)]
    time_ax.set_ylabel("share of the call's time")
    time_ax.set_xticks(list(xs), labels, fontsize=6, rotation=90)
    time_ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _kind_ms(row: dict, kind: str) -> float:
    """A kind's milliseconds per call (per-layer kinds times the layer count)."""
    if f"{kind}_ms" in row:
        return row[f"{kind}_ms"]
    return row[f"per_layer_{kind}_ms"] * row["layers"]


_SUITES = {
    "nested_linear": (nested_linear, _plot_kernel),
    "elastic_mlp": (elastic_mlp, _plot_kernel),
    "elastic_attention": (elastic_attention, _plot_attention),
    "elastic_model": (elastic_model, _plot_model),
    "token_routing": (token_routing, _plot_token_routing),
}
