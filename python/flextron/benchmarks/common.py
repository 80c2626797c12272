"""Shared benchmark machinery: timing in the forward, backward and full (training step)
modes with the one timer (flextron.timing), shape/width-mix definitions, JSON results and
plots.

Benchmarks report measured times and ratios against baselines measured in the same run;
nothing here asserts on speed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch

from flextron.latency import device_name as flextron_device_name
from flextron.timing import Stats, Timer


def default_out_dir(device: str) -> Path:
    """Where a run writes unless told otherwise: runs/ (git-ignored), dated."""
    return Path("runs") / f"bench-{dt.date.today().isoformat()}-{device}"


Mode = Literal["forward", "backward", "full"]
MODES: tuple[str, ...] = get_args(Mode)


@dataclass(frozen=True)
class BenchOptions:
    """What every benchmark suite takes. ``device`` is ``"cpu"`` or ``"cuda"`` (the current
    GPU); GPU shapes are the large ones (Llama-2-7B / Llama-3-8B), CPU shapes small ones."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    quick: bool = False  # fewer shapes and repeats: a smoke run
    modes: tuple[str, ...] = MODES  # forward, backward, full (see time_modes)
    out: Path = field(default_factory=lambda: default_out_dir("cpu"))

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"benchmark device must be 'cpu' or 'cuda', got {self.device!r}")
        if not self.modes or not set(self.modes) <= set(MODES):
            raise ValueError(f"benchmark modes are {list(MODES)}, got {list(self.modes)}")

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"

    def repeat(self, cpu_full: int) -> int:
        """Timed repeats per measurement: 20 on the GPU, ``cpu_full`` on the CPU (3 if quick)."""
        return 20 if self.on_gpu else (3 if self.quick else cpu_full)


# MLP shapes (hidden H, inner D) and token counts: Llama-2-7B / Llama-3-8B on the GPU,
# SmolLM-135M / TinyLlama-1.1B sized on the CPU.
GPU_SHAPES = {"llama2-7b": (4096, 11008), "llama3-8b": (4096, 14336)}
GPU_TOKENS = (512, 4096, 16384)
CPU_SHAPES = {"smollm-135m": (576, 1536), "tinyllama-1b": (2048, 5632)}
CPU_TOKENS = (256, 1024)

# Share of tokens per width choice (widest first).
MIXES = {"uniform": (0.25, 0.25, 0.25, 0.25), "skewed": (0.1, 0.2, 0.3, 0.4)}


def choices_for_mix(tokens: int, mix: tuple[float, ...], device: str, seed: int = 0) -> torch.Tensor:
    """Exactly round(tokens * share) tokens per choice, in a random order."""
    counts = [round(tokens * share) for share in mix]
    counts[0] += tokens - sum(counts)
    choice = torch.cat([torch.full((c,), g, dtype=torch.long) for g, c in enumerate(counts)])
    gen = torch.Generator().manual_seed(seed)
    return choice[torch.randperm(tokens, generator=gen)].to(device)


def mean_fraction(widths: list[int], mix: tuple[float, ...]) -> float:
    return sum(share * w for share, w in zip(mix, widths, strict=True)) / widths[0]


def time_all(fns: dict[str, Callable[[], object]], device: str, repeat: int = 10) -> dict[str, Stats]:
    """``{name: Stats}``: the callables timed interleaved by this device's Timer (L2 flushed
    on a GPU; see flextron.timing)."""
    return _timer(device).measure(fns, repeat=repeat)


def time_modes(
    fns: dict[str, Callable[[], torch.Tensor]],
    leaves: Sequence[torch.Tensor],
    device: str,
    repeat: int,
    modes: Sequence[str] = MODES,
) -> dict[str, Stats]:
    """Each callable in each mode, all timed interleaved: ``forward`` as in inference (no
    autograd graph; key ``NAME``), ``backward`` alone (of one recorded forward, its graph
    retained; ``NAME_backward``) and ``full``, a training step's forward + backward
    (``NAME_full``). Gradients flow to ``leaves`` (inputs and weights; their ``requires_grad``
    and ``.grad`` are restored afterwards)."""
    timed: dict[str, Callable[[], object]] = {}
    if "forward" in modes:
        timed |= {name: _in_grad_mode(fn, False) for name, fn in fns.items()}
    with _requiring_grad(leaves):
        if "backward" in modes:
            for name, fn in fns.items():
                with torch.enable_grad():
                    loss = fn().float().sum()
                timed[f"{name}_backward"] = lambda loss=loss: loss.backward(retain_graph=True)
        if "full" in modes:
            timed |= {
                f"{name}_full": _in_grad_mode(lambda fn=fn: fn().float().sum().backward(), True)
                for name, fn in fns.items()
            }
        return time_all(timed, device, repeat)


def mode_ratios(stats: dict[str, Stats], numerator: str, denominator: str, column: str) -> dict[str, float]:
    """``{mode}_{column}``: numerator / denominator time in the backward and full modes that
    ran."""
    return {
        f"{mode}_{column}": stats[f"{numerator}_{mode}"].median / stats[f"{denominator}_{mode}"].median
        for mode in ("backward", "full")
        if f"{numerator}_{mode}" in stats and f"{denominator}_{mode}" in stats
    }


def _in_grad_mode(fn: Callable[[], object], enabled: bool) -> Callable[[], object]:
    def call() -> object:
        with torch.set_grad_enabled(enabled):
            return fn()

    return call


@contextlib.contextmanager
def _requiring_grad(leaves: Sequence[torch.Tensor]) -> Iterator[None]:
    before = [(t.requires_grad, t.grad) for t in leaves]
    for t in leaves:
        t.requires_grad_(True)
    try:
        yield
    finally:
        for t, (required, grad) in zip(leaves, before, strict=True):
            t.requires_grad_(required)
            t.grad = grad


@functools.cache
def _timer(device: str) -> Timer:
    return Timer(device)


def device_name(device: str) -> str:
    return flextron_device_name(torch.device(device))


@dataclass
class Results:
    benchmark: str
    device: str
    rows: list[dict] = field(default_factory=list)
    date: str = field(default_factory=lambda: dt.date.today().isoformat())
    device_name: str = ""
    torch_version: str = torch.__version__

    def __post_init__(self) -> None:
        self.device_name = self.device_name or device_name(self.device)
        self._out_dir: Path | None = None

    def write_as_you_go(self, out_dir: Path) -> None:
        """Rewrite the JSON after every row, so a run cut short by a time limit keeps its rows."""
        self._out_dir = out_dir

    def add(self, **row) -> None:
        self.rows.append(row)
        print("  " + ", ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
        if self._out_dir is not None:
            self.write(self._out_dir)

    def write(self, out_dir: Path) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{self.benchmark}-{self.device}.json"
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")
        return path


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        print("  ".join(_fmt(row.get(c, "")).rjust(w) for c, w in zip(columns, widths, strict=True)))


def run_mlp_shape_sweep(
    benchmark: str,
    bench_case: Callable[..., None],
    table_columns: list[str],
    options: BenchOptions,
) -> Path:
    """The sweep shared by the MLP-shaped benchmarks: shapes x tokens x mixes, a printed
    table and JSON. ``bench_case(results, device, dtype, name, hidden, inner, tokens,
    mix_name, repeat, modes)`` measures one case and adds its row."""
    shapes = GPU_SHAPES if options.on_gpu else CPU_SHAPES
    tokens_list = GPU_TOKENS if options.on_gpu else CPU_TOKENS
    if options.quick:
        shapes = dict(list(shapes.items())[:1])
        tokens_list = tokens_list[:2] if options.on_gpu else tokens_list[:1]
    results = Results(benchmark, options.device)
    results.write_as_you_go(options.out)
    print(f"{benchmark} benchmark on {results.device_name}, {options.dtype}")
    for name, (hidden, inner) in shapes.items():
        for tokens in tokens_list:
            for mix_name in MIXES:
                bench_case(
                    results,
                    options.device,
                    options.dtype,
                    name,
                    hidden,
                    inner,
                    tokens,
                    mix_name,
                    options.repeat(9),
                    options.modes,
                )
    print_table(results.rows, table_columns)
    path = results.write(options.out)
    print(f"wrote {path}")
    return path


def save_bar_plots(panels: list[tuple[dict, list[str], dict[str, list[float]], str]], out: Path) -> Path:
    """One bar chart per ``(results JSON, labels, {series: values}, y label)`` side by side,
    with the dense baseline at 1.0 and the run's device and date in each title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widest = max(len(labels) for _, labels, _, _ in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(max(7, 0.35 * widest) * len(panels), 5), squeeze=False)
    for ax, (data, labels, series, ylabel) in zip(axes[0], panels, strict=True):
        xs = list(range(len(labels)))
        width = 0.8 / len(series)
        for k, (name, values) in enumerate(series.items()):
            offset = (k - (len(series) - 1) / 2) * width
            ax.bar([x + offset for x in xs], values, width, label=name)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xticks(xs, labels, fontsize=6, rotation=90)
        ax.set_ylabel(ylabel)
        ax.set_title(
            f"{data['benchmark']} on {data['device_name']}\n{data['date']}, torch {data['torch_version']}",
            fontsize=9,
        )
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
