"""GPU benchmarks of flextron's nested GEMMs and elastic MLP, for benchmarks/gpu_check.sh.

Times (CUDA events, after warm-up, the L2 flushed by writing a 256 MB buffer before every
sample, ours and the baselines interleaved ABAB, median and p20/p80 of >= 10 samples, data
generated on the GPU) at the Llama-3-8B MLP shape (H=4096, D=14336, widths 100/75/50/25%):

- a bf16 8192^3 torch.matmul: the TFLOP/s ceiling of this GPU;
- nested_linear_n / nested_linear_k / nested_weight_grad vs the cuBLAS dense GEMM at full
  width (useful TFLOP/s of ours vs the dense TFLOP/s, FLOP share r), vs torch._grouped_mm on
  groups padded to full width (if available), and vs a per-group loop of torch matmuls on
  weight slices;
- elastic_mlp forward and forward+backward vs the dense SwiGLU MLP and the per-group loop
  (reference.py), with the routing (route_plan + permute + unpermute) share; eager and
  CUDA-graph replay at T=16; nested_activation GB/s;
- both sides of the small-T dispatch rule (flextron._C.set_dense_rows_limit): the grouped
  kernel vs one dense GEMM at the widest width, and where they cross.

The JSON is rewritten after every row (a run cut by a time limit keeps its rows); rows stop
being added past --budget-s. The targets in ``headline`` are reported, never asserted.

    python -m benchmarks.gpu_bench --out bench.json [--budget-s 150] [--dry-run]

``--dry-run`` runs tiny shapes on the CPU (no GPU needed) to exercise the same code paths.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

try:  # the extension may not import while it is being edited: rows record the error
    import flextron
    from flextron import reference
    from flextron.benchmarks.common import MIXES, choices_for_mix
    from flextron.conversion import default_mlp_widths
    from flextron.timing import Stats, Timer, stats_columns

    IMPORT_ERROR: str | None = None
except Exception as error:  # pragma: no cover - only without a working build
    IMPORT_ERROR = f"import flextron failed: {error!r}"

GEMM_OPS = ("nested_linear_n", "nested_linear_k", "nested_weight_grad")
ALWAYS_GROUPED, ALWAYS_DENSE = 0, 1 << 30


@dataclass(frozen=True)
class Config:
    device: str
    dtype: torch.dtype
    hidden: int
    inner: int
    tokens: tuple[int, ...]  # in the order measured (the headline shapes first)
    ceiling: int  # n of the n^3 matmul
    repeat: int  # samples per measurement (small T: twice as many)
    warmup: int
    flush_mb: int
    crossover_tokens: tuple[int, ...]
    graph_tokens: int
    activation_tokens: tuple[int, ...]


GPU_CONFIG = Config(
    device="cuda",
    dtype=torch.bfloat16,
    hidden=4096,
    inner=14336,
    tokens=(4096, 16384, 16, 1024, 256, 64),
    ceiling=8192,
    repeat=10,
    warmup=3,
    flush_mb=256,
    crossover_tokens=(1, 16, 64, 128, 256),
    graph_tokens=16,
    activation_tokens=(4096, 16384),
)
DRY_CONFIG = Config(
    device="cpu",
    dtype=torch.float32,
    hidden=64,
    inner=256,
    tokens=(16,),
    ceiling=128,
    repeat=3,
    warmup=1,
    flush_mb=0,
    crossover_tokens=(1, 16),
    graph_tokens=16,
    activation_tokens=(64,),
)


def usable(fns: dict[str, Callable[[], object]], sync: Callable[[], None]) -> tuple[dict, dict[str, str]]:
    """Run each baseline once: drop the ones that fail (their error goes in the row).
    ``ours`` is not guarded: its failure is the row's error."""
    ok, errors = {}, {}
    for name, fn in fns.items():
        if name == "ours":
            fn()
            sync()
            ok[name] = fn
            continue
        try:
            fn()
            sync()
            ok[name] = fn
        except Exception as error:
            errors[f"{name}_error"] = f"{type(error).__name__}: {error}"[:300]
    return ok, errors


@dataclass
class Routed:
    """Tokens of one (T, mix) case routed by flextron.route_plan."""

    widths: list[int]
    choice: torch.Tensor
    plan: Any
    counts: list[int]
    bounds: list[int]

    @property
    def groups(self) -> list[tuple[int, int, int]]:
        """(start, end, width) of every non-empty group."""
        return [
            (s, e, d) for s, e, d in zip(self.bounds, self.bounds[1:], self.widths, strict=False) if e > s
        ]

    def share(self, inner: int) -> float:
        """FLOP share r: mean width / full width."""
        tokens = sum(self.counts)
        return sum(c * d for c, d in zip(self.counts, self.widths, strict=True)) / (tokens * inner)


def routed(cfg: Config, tokens: int, mix: str) -> Routed:
    widths = list(default_mlp_widths(cfg.inner))
    choice = choices_for_mix(tokens, MIXES[mix], cfg.device)
    plan = flextron.route_plan(choice, widths)
    counts = torch.bincount(choice.cpu(), minlength=len(widths)).tolist()
    return Routed(widths, choice, plan, counts, [0, *itertools.accumulate(counts)])


def randn(cfg: Config, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, device=cfg.device, dtype=torch.float32).mul_(scale).to(cfg.dtype)


@dataclass
class Bench:
    out: Path
    cfg: Config
    timer: Timer | None  # None when flextron does not import (the one row says why)
    budget_s: float
    dry_run: bool
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def repeat(self, tokens: int) -> int:
        return self.cfg.repeat * (2 if tokens <= 256 else 1)

    def add(self, labels: dict[str, Any], body: Callable[[], dict[str, Any]]) -> None:
        name = " ".join(f"{k}={v}" for k, v in labels.items())
        if self.elapsed() > self.budget_s:
            self.skipped.append(name)
            return
        t0 = time.perf_counter()
        try:
            if IMPORT_ERROR is not None:
                raise RuntimeError(IMPORT_ERROR)
            row = {**labels, **body()}
        except Exception as error:  # recorded: the next rows still run
            row = {**labels, "error": f"{type(error).__name__}: {error}"[:600]}
        row["seconds"] = round(time.perf_counter() - t0, 2)
        self.rows.append(row)
        print(
            "  " + ", ".join(f"{k}={_fmt(v)}" for k, v in row.items() if not k.endswith(("p20_ms", "p80_ms")))
        )
        self.write()

    def write(self, complete: bool = False) -> dict[str, Any]:
        data = {
            "device": torch.cuda.get_device_name() if self.cfg.device == "cuda" else "cpu",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "dtype": str(self.cfg.dtype).removeprefix("torch."),
            "shape": {"H": self.cfg.hidden, "D": self.cfg.inner},
            "dry_run": self.dry_run,
            "method": "CUDA events after warm-up; L2 flushed (256 MB write) before every sample; "
            "ours and baselines interleaved ABAB; median, p20, p80 in ms",
            "budget_s": self.budget_s,
            "elapsed_s": round(self.elapsed(), 1),
            "complete": complete,
            "skipped_rows": self.skipped,
            "headline": headline(self.rows),
            "rows": self.rows,
        }
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, self.out)
        return data


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------
# Rows


def ceiling_row(b: Bench) -> dict[str, Any]:
    n = b.cfg.ceiling
    x, y = randn(b.cfg, n, n), randn(b.cfg, n, n)
    stats = b.timer.measure({"matmul": lambda: torch.matmul(x, y)}, b.cfg.repeat, b.cfg.warmup)
    return {"n": n, **stats_columns(stats), "tflops": 2 * n**3 / stats["matmul"].median / 1e9}


def gemm_row(b: Bench, op: str, tokens: int, mix: str) -> dict[str, Any]:
    cfg, r = b.cfg, routed(b.cfg, tokens, mix)
    hidden, inner, offsets, widths = cfg.hidden, cfg.inner, r.plan.offsets, r.plan.widths
    ends = offsets[1:].contiguous()
    fns: dict[str, Callable[[], object]]
    if op == "nested_linear_n":  # x [T, H] @ w[:d].T -> [T, D]
        x, w = randn(cfg, tokens, hidden), randn(cfg, inner, hidden, scale=hidden**-0.5)
        padded = torch.zeros(len(r.widths), inner, hidden, device=cfg.device, dtype=cfg.dtype)
        for g, d in enumerate(r.widths):
            padded[g, :d] = w[:d]
        padded_b = padded.transpose(-2, -1)  # [G, H, D], column-major
        fns = {
            "ours": lambda: flextron.nested_linear_n(x, w, offsets, widths),
            "dense": lambda: torch.matmul(x, w.t()),
            "loop": lambda: [x[s:e] @ w[:d].t() for s, e, d in r.groups],
            "grouped_mm": lambda: torch._grouped_mm(x, padded_b, offs=ends),
        }
    elif op == "nested_linear_k":  # x[:, :d] @ w[:, :d].T: [T, D] -> [T, H]
        x, w = randn(cfg, tokens, inner), randn(cfg, hidden, inner, scale=inner**-0.5)
        padded = torch.zeros(len(r.widths), hidden, inner, device=cfg.device, dtype=cfg.dtype)
        for g, d in enumerate(r.widths):
            padded[g, :, :d] = w[:, :d]
        padded_b = padded.transpose(-2, -1)  # [G, D, H], column-major
        fns = {
            "ours": lambda: flextron.nested_linear_k(x, w, offsets, widths),
            "dense": lambda: torch.matmul(x, w.t()),
            "loop": lambda: [x[s:e, :d] @ w[:, :d].t() for s, e, d in r.groups],
            "grouped_mm": lambda: torch._grouped_mm(x, padded_b, offs=ends),
        }
    else:  # nested_weight_grad: dw[:d] += dy[:, :d].T @ x -> [D, H]
        dy, x = randn(cfg, tokens, inner), randn(cfg, tokens, hidden)
        dy_t, x_cm = dy.t().contiguous(), x.t().contiguous().t()

        def loop() -> torch.Tensor:
            out = torch.zeros(inner, hidden, device=cfg.device, dtype=cfg.dtype)
            for s, e, d in r.groups:
                out[:d] += dy[s:e, :d].t() @ x[s:e]
            return out

        fns = {
            "ours": lambda: flextron.nested_weight_grad(dy, x, offsets, widths),
            "dense": lambda: torch.matmul(dy.t(), x),
            "loop": loop,
            "grouped_mm": lambda: torch._grouped_mm(dy_t, x_cm, offs=ends),  # [G, D, H], padded
        }
    if not hasattr(torch, "_grouped_mm"):
        del fns["grouped_mm"]
    fns, errors = usable(fns, b.timer.sync)
    stats = b.timer.measure(fns, b.repeat(tokens), cfg.warmup)
    useful = 2 * hidden * sum(c * d for c, d in zip(r.counts, r.widths, strict=True))
    dense_flops = 2 * hidden * inner * tokens
    ours, dense = stats["ours"].median, stats["dense"].median
    row = {
        "widths": r.widths,
        "flop_share_r": round(useful / dense_flops, 4),
        **stats_columns(stats),
        "ours_useful_tflops": useful / ours / 1e9,
        "dense_tflops": dense_flops / dense / 1e9,
        "efficiency_vs_dense": (useful / ours) / (dense_flops / dense),
        **errors,
    }
    if "loop" in stats:
        row["speedup_vs_loop"] = stats["loop"].median / ours
    if "grouped_mm" in stats:
        row["speedup_vs_grouped_mm"] = stats["grouped_mm"].median / ours
    return row


def mlp_params(cfg: Config) -> dict[str, torch.Tensor]:
    hidden, inner = cfg.hidden, cfg.inner
    return {
        "w_up": randn(cfg, inner, hidden, scale=hidden**-0.5),
        "w_gate": randn(cfg, inner, hidden, scale=hidden**-0.5),
        "w_down": randn(cfg, hidden, inner, scale=inner**-0.5),
    }


def mlp_row(b: Bench, tokens: int, mix: str) -> dict[str, Any]:
    cfg, r = b.cfg, routed(b.cfg, tokens, mix)
    params, widths, choice = mlp_params(cfg), r.widths, r.choice
    x = randn(cfg, tokens, cfg.hidden)

    def routing() -> torch.Tensor:
        plan = flextron.route_plan(choice, widths)
        return flextron.unpermute(flextron.permute(x, plan), plan)

    forward = {
        "ours": lambda: flextron.elastic_mlp(x, choice, widths=widths, **params),
        "dense": lambda: reference.dense_mlp(x, **params),
        "loop": lambda: reference.elastic_mlp(x, choice, widths=widths, **params),
        "routing": routing,
    }
    with torch.no_grad():
        forward, errors = usable(forward, b.timer.sync)
        stats = b.timer.measure(forward, b.repeat(tokens), cfg.warmup)
    train_stats, train_errors = train_stats_of(b, tokens, x, choice, widths, params)
    share = r.share(cfg.inner)
    ours, dense = stats["ours"].median, stats["dense"].median
    row = {
        "widths": widths,
        "flop_share_r": round(share, 4),
        **stats_columns(stats, "fwd_"),
        **stats_columns(train_stats, "train_"),
        "fwd_vs_dense": ours / dense,
        "fwd_vs_ideal": ours / (share * dense),
        **errors,
        **train_errors,
    }
    if "ours" in train_stats:
        row["train_vs_dense"] = train_stats["ours"].median / train_stats["dense"].median
        row["train_vs_ideal"] = train_stats["ours"].median / (share * train_stats["dense"].median)
    if "loop" in stats:
        row["fwd_speedup_vs_loop"] = stats["loop"].median / ours
    if "loop" in train_stats and "ours" in train_stats:
        row["train_speedup_vs_loop"] = train_stats["loop"].median / train_stats["ours"].median
    if "routing" in stats:
        row["routing_share"] = stats["routing"].median / ours
    return row


def train_stats_of(
    b: Bench,
    tokens: int,
    x: torch.Tensor,
    choice: torch.Tensor,
    widths: list[int],
    params: dict[str, torch.Tensor],
) -> tuple[dict[str, Stats], dict[str, str]]:
    """Forward+backward (to x and every weight) of ours, the dense MLP and the loop. A
    failing backward of ours is recorded (``train_error``), not the row's error."""
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    x_train = x.detach().requires_grad_()
    grad_out = randn(b.cfg, tokens, b.cfg.hidden)

    def train(mlp: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            for leaf in (x_train, *leaves.values()):
                leaf.grad = None
            mlp().backward(grad_out)

        return step

    training = {
        "ours": train(lambda: flextron.elastic_mlp(x_train, choice, widths=widths, **leaves)),
        "dense": train(lambda: reference.dense_mlp(x_train, **leaves)),
        "loop": train(lambda: reference.elastic_mlp(x_train, choice, widths=widths, **leaves)),
    }
    try:
        training, errors = usable(training, b.timer.sync)
    except Exception as error:
        return {}, {"train_error": f"{type(error).__name__}: {error}"[:300]}
    stats = b.timer.measure(training, b.repeat(tokens), b.cfg.warmup)
    return stats, {f"train_{k}": v for k, v in errors.items()}


def graph_row(b: Bench, tokens: int) -> dict[str, Any]:
    """elastic_mlp and the dense MLP, eager and replayed from a CUDA graph."""
    cfg, r = b.cfg, routed(b.cfg, tokens, "uniform")
    params, widths, choice = mlp_params(cfg), r.widths, r.choice
    x = randn(cfg, tokens, cfg.hidden)

    def ours() -> torch.Tensor:
        return flextron.elastic_mlp(x, choice, widths=widths, **params)

    def dense() -> torch.Tensor:
        return reference.dense_mlp(x, **params)

    fns: dict[str, Callable[[], object]] = {"ours_eager": ours, "dense_eager": dense}
    errors, graphs = {}, []
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for fn in (ours, dense, ours, dense):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        for name, fn in (("ours", ours), ("dense", dense)):
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fn()
                graphs.append(graph)
                fns[f"{name}_graph"] = graph.replay
            except Exception as error:  # e.g. a host sync inside the op
                errors[f"{name}_graph_error"] = f"{type(error).__name__}: {error}"[:300]
        stats = b.timer.measure(fns, b.repeat(tokens), cfg.warmup)
    row = {
        "widths": widths,
        **stats_columns(stats),
        "eager_vs_dense": stats["ours_eager"].median / stats["dense_eager"].median,
        **errors,
    }
    if "ours_graph" in stats and "dense_graph" in stats:
        row["graph_vs_dense"] = stats["ours_graph"].median / stats["dense_graph"].median
    return row


def activation_row(b: Bench, tokens: int) -> dict[str, Any]:
    cfg, r = b.cfg, routed(b.cfg, tokens, "uniform")
    h, gate = randn(cfg, tokens, cfg.inner), randn(cfg, tokens, cfg.inner)
    offsets, widths = r.plan.offsets, r.plan.widths
    fns = {
        "ours": lambda: flextron.nested_activation(h, offsets, widths, "swiglu", gate),
        "dense": lambda: torch.nn.functional.silu(gate) * h,
    }
    fns, errors = usable(fns, b.timer.sync)
    stats = b.timer.measure(fns, b.repeat(tokens), cfg.warmup)
    size = h.element_size()
    full_bytes = 3 * tokens * cfg.inner * size  # read h and gate, write out
    useful_bytes = size * sum(c * (2 * d + cfg.inner) for c, d in zip(r.counts, r.widths, strict=True))
    row = {**stats_columns(stats), "ours_gbps": full_bytes / stats["ours"].median / 1e6, **errors}
    row["ours_useful_gbps"] = useful_bytes / stats["ours"].median / 1e6
    if "dense" in stats:
        row["dense_gbps"] = full_bytes / stats["dense"].median / 1e6
    return row


def dense_rows_row(b: Bench) -> dict[str, Any]:
    """nested_linear_n/k at small T with the dense-rows limit at 0 (always the grouped
    kernel) and at 2^30 (always one dense GEMM at the widest width), interleaved."""
    setter = getattr(getattr(flextron, "_C", None), "set_dense_rows_limit", None)
    if setter is None:
        return {"skipped": "flextron._C has no set_dense_rows_limit"}
    cfg = b.cfg
    default = setter(ALWAYS_GROUPED)
    setter(default)
    measurements = []
    try:
        for tokens in cfg.crossover_tokens:
            r = routed(cfg, tokens, "uniform")
            offsets, widths = r.plan.offsets, r.plan.widths
            x_n, w_n = (
                randn(cfg, tokens, cfg.hidden),
                randn(cfg, cfg.inner, cfg.hidden, scale=cfg.hidden**-0.5),
            )
            x_k, w_k = randn(cfg, tokens, cfg.inner), randn(cfg, cfg.hidden, cfg.inner, scale=cfg.inner**-0.5)
            ops = {
                "nested_linear_n": lambda x=x_n, w=w_n, o=offsets, ws=widths: flextron.nested_linear_n(
                    x, w, o, ws
                ),
                "nested_linear_k": lambda x=x_k, w=w_k, o=offsets, ws=widths: flextron.nested_linear_k(
                    x, w, o, ws
                ),
            }
            for op, run in ops.items():
                fns = {
                    "grouped": lambda run=run: (setter(ALWAYS_GROUPED), run()),
                    "dense": lambda run=run: (setter(ALWAYS_DENSE), run()),
                }
                stats = b.timer.measure(fns, b.repeat(tokens), cfg.warmup)
                measurements.append(
                    {
                        "op": op,
                        "T": tokens,
                        **stats_columns(stats),
                        "dense_faster": stats["dense"].median < stats["grouped"].median,
                    }
                )
    finally:
        setter(default)
    crossover = {}
    for op in ("nested_linear_n", "nested_linear_k"):
        grouped_wins = [m["T"] for m in measurements if m["op"] == op and not m["dense_faster"]]
        crossover[op] = min(grouped_wins) if grouped_wins else None
    return {"default_limit": default, "crossover_T": crossover, "measurements": measurements}


# ---------------------------------------------------------------------------------------
# Headline: the targets, reported (never asserted)


def headline(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def values(kind: str, key: str, keep: Callable[[dict], bool] = lambda r: True) -> list[float]:
        return [r[key] for r in rows if r.get("kind") == kind and isinstance(r.get(key), float) and keep(r)]

    def entry(vals: list[float], worst: Callable, target: str, met: Callable[[float], bool]) -> dict:
        if not vals:
            return {"value": None, "target": target, "met": None, "note": "not measured"}
        value = worst(vals)
        return {"value": round(value, 4), "target": target, "met": bool(met(value)), "n": len(vals)}

    out: dict[str, Any] = {}
    tflops = values("ceiling", "tflops")
    out["matmul_tflops"] = float(f"{tflops[0]:.4g}") if tflops else None
    for op in GEMM_OPS:
        out[f"{op}_efficiency_vs_dense_T>=4096"] = entry(
            values("gemm", "efficiency_vs_dense", lambda r, op=op: r["op"] == op and r["T"] >= 4096),
            min,
            "ours useful TFLOP/s >= 0.70 x cuBLAS dense TFLOP/s (worst row)",
            lambda v: v >= 0.70,
        )
    large = lambda r: r["T"] >= 4096  # noqa: E731
    out["mlp_fwd_vs_ideal_T>=4096"] = entry(
        values("elastic_mlp", "fwd_vs_ideal", large), max, "<= 1.15 x (r x dense time)", lambda v: v <= 1.15
    )
    out["mlp_train_vs_ideal_T>=4096"] = entry(
        values("elastic_mlp", "train_vs_ideal", large), max, "<= 1.15 x (r x dense time)", lambda v: v <= 1.15
    )
    out["mlp_fwd_speedup_vs_loop_T=16384"] = entry(
        values("elastic_mlp", "fwd_speedup_vs_loop", lambda r: r["T"] == 16384),
        min,
        ">= 1.5",
        lambda v: v >= 1.5,
    )
    out["routing_share_T>=4096"] = entry(
        values("elastic_mlp", "routing_share", large), max, "<= 0.10 of the MLP", lambda v: v <= 0.10
    )
    out["mlp_fwd_vs_dense_T=16_eager"] = entry(
        values("elastic_mlp", "fwd_vs_dense", lambda r: r["T"] == 16), max, "<= 1.0", lambda v: v <= 1.0
    )
    out["mlp_fwd_vs_dense_T=16_graph"] = entry(
        values("mlp_graph", "graph_vs_dense"), max, "<= 1.0", lambda v: v <= 1.0
    )
    crossover = [r for r in rows if r.get("kind") == "dense_rows_limit"]
    if crossover:
        row = crossover[0]
        out["dense_rows_limit"] = {
            k: row[k] for k in ("default_limit", "crossover_T", "skipped", "error") if k in row
        }
    return out


def plan_rows(b: Bench) -> list[tuple[dict[str, Any], Callable[[], dict[str, Any]]]]:
    """Every row, in the order measured (cheap and headline rows first)."""
    cfg = b.cfg
    rows: list[tuple[dict[str, Any], Callable[[], dict[str, Any]]]] = [
        ({"kind": "ceiling"}, lambda: ceiling_row(b)),
        ({"kind": "dense_rows_limit"}, lambda: dense_rows_row(b)),
    ]
    for tokens in cfg.tokens:
        for mix in MIXES:
            for op in GEMM_OPS:
                labels = {"kind": "gemm", "op": op, "T": tokens, "mix": mix}
                rows.append((labels, lambda op=op, t=tokens, m=mix: gemm_row(b, op, t, m)))
            labels = {"kind": "elastic_mlp", "T": tokens, "mix": mix}
            rows.append((labels, lambda t=tokens, m=mix: mlp_row(b, t, m)))
        if tokens == cfg.graph_tokens:
            labels = {"kind": "mlp_graph", "T": tokens, "mix": "uniform"}
            if cfg.device == "cuda":
                rows.append((labels, lambda t=tokens: graph_row(b, t)))
            else:
                rows.append((labels, lambda: {"skipped": "needs CUDA (dry run)"}))
    for tokens in cfg.activation_tokens:
        labels = {"kind": "activation", "T": tokens, "mix": "uniform"}
        rows.append((labels, lambda t=tokens: activation_row(b, t)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (no GPU needed)")
    parser.add_argument("--budget-s", type=float, default=150.0, help="add no row after this many seconds")
    args = parser.parse_args(argv)
    cfg = DRY_CONFIG if args.dry_run else GPU_CONFIG
    if cfg.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device (use --dry-run on a machine without a GPU)")
    if args.dry_run:
        torch.set_num_threads(1)  # tiny tensors: threads only contend
    torch.manual_seed(0)
    timer = Timer(cfg.device, cfg.flush_mb) if IMPORT_ERROR is None else None
    bench = Bench(args.out, cfg, timer, args.budget_s, args.dry_run)
    rows = plan_rows(bench) if IMPORT_ERROR is None else [({"kind": "import"}, lambda: {})]
    print(f"gpu_bench on {cfg.device}, {cfg.dtype}, H={cfg.hidden}, D={cfg.inner}, budget {args.budget_s} s")
    for labels, body in rows:
        bench.add(labels, body)
    data = bench.write(complete=not bench.skipped)
    errors = sum("error" in r for r in bench.rows)
    print(
        f"gpu_bench: {len(bench.rows)} rows ({errors} with errors), {len(bench.skipped)} skipped "
        f"past the budget, {data['elapsed_s']} s -> {args.out}"
    )
    for name, value in data["headline"].items():
        print(f"  {name}: {json.dumps(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
