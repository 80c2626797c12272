"""Correctness sweep of flextron's nested ops on the GPU, for benchmarks/gpu_check.sh.

Every case compares flextron against a float64 reference (python/flextron/reference.py,
computed on the same device) and records the max abs error and the bound the tests use
(tests/helpers.py ``assert_close_to_reference``: ``factor`` x the error of the reference
computed in the low dtype, plus the dtype floor ``ATOL`` x max(1, max |exact|)). Cases:
dtypes bf16/fp16/fp32 x the four nested GEMMs x token counts x width sets (with empty
first/middle/last groups), misaligned views, transposed weights (as the backward passes
them), elastic_mlp forward+backward, a side stream, and CUDA-graph replay with new choices
written into the captured buffers. Each case catches its own exception, so one failure
(or an op missing from the extension) does not stop the sweep.

    python -m benchmarks.gpu_correctness --out correctness.json [--dry-run]

``--dry-run`` runs tiny shapes on the CPU (no GPU needed) to exercise the same code paths.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

try:  # the bound rule of the test suite (run from the repository root)
    from tests.helpers import ATOL, assert_close_to_reference

    FACTOR = float(inspect.signature(assert_close_to_reference).parameters["factor"].default)
    BOUND_RULE = "tests/helpers.py assert_close_to_reference"
except ImportError:  # pragma: no cover - only outside the repository
    ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
    FACTOR = 2.0
    BOUND_RULE = "fallback copy of tests/helpers.py (tests.helpers did not import)"

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
NESTED_OPS = ("nested_linear_n", "nested_linear_k", "nested_weight_grad", "nested_weight_grad_k")
# Share of tokens per width choice (widest first); zeros make empty groups.
MIXES = {
    "all": (0.25, 0.25, 0.25, 0.25),
    "empty_first": (0.0, 0.4, 0.3, 0.3),
    "empty_middle": (0.5, 0.0, 0.0, 0.5),
    "empty_last": (0.4, 0.3, 0.3, 0.0),
}


@dataclass(frozen=True)
class Config:
    device: str
    nested: int  # size of the nested dimension (the widest width)
    other: int  # size of the free dimension
    tokens: tuple[int, ...]
    width_sets: dict[str, list[int]]
    mlp_hidden: int
    mlp_tokens: tuple[int, ...]
    graph_tokens: int


GPU_CONFIG = Config(
    device="cuda",
    nested=4096,
    other=4096,
    tokens=(1, 127, 1000, 4096),
    width_sets={"w4": [4096, 3072, 2048, 1024], "odd": [4096, 3000, 1001, 8]},
    mlp_hidden=1024,
    mlp_tokens=(1, 1000),
    graph_tokens=1000,
)
DRY_CONFIG = Config(
    device="cpu",
    nested=64,
    other=32,
    tokens=(7,),
    width_sets={"w4": [64, 48, 32, 16], "odd": [64, 40, 9, 1]},
    mlp_hidden=32,
    mlp_tokens=(7,),
    graph_tokens=7,
)


# What a case body returns: (max_error, bound), or (suffix, max_error, bound) per output.
Result = tuple[float, float] | list[tuple[str, float, float]]


@dataclass
class Case:
    name: str
    dtype: str
    op: str
    T: int
    widths: list[int]
    max_error: float | str | None = None
    bound: float | str | None = None
    ok: bool | None = None  # None: skipped
    error: str | None = None
    seconds: float = 0.0


@dataclass
class Sweep:
    out: Path
    budget_s: float
    dry_run: bool
    device: str
    cases: list[Case] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)
    errors_seen: set[str] = field(default_factory=set)

    def over_budget(self) -> bool:
        return time.perf_counter() - self.start > self.budget_s

    def run(self, case: Case, body: Callable[[], Result]) -> None:
        """Run one case: ``body`` returns (max_error, bound), or a list of (suffix, error,
        bound) for a case with several outputs (recorded as one case each)."""
        if self.over_budget():
            case.error = f"skipped: over the {self.budget_s:.0f} s budget"
            self.cases.append(case)
            return
        t0 = time.perf_counter()
        try:
            result = body()
            if self.device == "cuda":
                torch.cuda.synchronize()
        except Exception as error:  # recorded per case: the sweep goes on
            case.ok = False
            case.error = f"{type(error).__name__}: {error}"[:600]
            case.seconds = round(time.perf_counter() - t0, 3)
            self.cases.append(case)
            if case.error not in self.errors_seen:  # each distinct error once
                self.errors_seen.add(case.error)
                print(f"  FAIL {case.name} {case.dtype}: {case.error.splitlines()[0]}", flush=True)
            self._maybe_write()
            return
        seconds = round(time.perf_counter() - t0, 3)
        parts = result if isinstance(result, list) else [("", *result)]
        for suffix, err, bound in parts:
            one = Case(**{**asdict(case), "name": case.name + suffix, "seconds": seconds})
            one.max_error, one.bound = _number(err), _number(bound)
            one.ok = bool(err <= bound)  # False for NaN
            if not one.ok:
                print(f"  FAIL {one.name} {one.dtype}: error {err:.3e} > bound {bound:.3e}", flush=True)
            self.cases.append(one)
        self._maybe_write()

    def skip(self, case: Case, reason: str) -> None:
        case.error = f"skipped: {reason}"
        self.cases.append(case)

    def _maybe_write(self) -> None:
        if len(self.cases) % 25 == 0:  # a run cut by its time limit keeps its cases
            self.write()

    def write(self) -> dict[str, Any]:
        ok = sum(c.ok is True for c in self.cases)
        failed = sum(c.ok is False for c in self.cases)
        data = {
            "device": _device_name(self.device),
            "torch": torch.__version__,
            "dry_run": self.dry_run,
            "bound_rule": f"{BOUND_RULE}: {FACTOR:g} x error of the reference in the low dtype "
            "+ ATOL[dtype] x max(1, max|exact|); both references run on the sweep's device "
            "(the tests run the low-dtype one on the CPU)",
            "elapsed_s": round(time.perf_counter() - self.start, 2),
            "budget_s": self.budget_s,
            "ok_count": ok,
            "fail_count": failed,
            "skip_count": len(self.cases) - ok - failed,
            "cases": [asdict(c) for c in self.cases],
        }
        write_json(self.out, data)
        return data


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _number(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def _device_name(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu"


def error_and_bound(out: torch.Tensor, ref_low: torch.Tensor, ref_exact: torch.Tensor) -> tuple[float, float]:
    """(max |out - exact|, the test suite's bound), computed on the tensors' device."""
    if out.shape != ref_exact.shape:
        raise ValueError(f"shape {tuple(out.shape)} != reference shape {tuple(ref_exact.shape)}")
    if out.dtype != ref_low.dtype:
        raise ValueError(f"dtype {out.dtype} != reference dtype {ref_low.dtype}")
    atol = ATOL[out.dtype]
    if out.numel() == 0:
        return 0.0, atol
    exact = ref_exact.double()
    ours = (out.double() - exact).abs().max().item()
    theirs = (ref_low.double() - exact).abs().max().item()
    scale = exact.abs().max().item()
    return ours, FACTOR * theirs + atol * max(1.0, scale)


def make_choice(tokens: int, shares: tuple[float, ...], device: str, gen: torch.Generator) -> torch.Tensor:
    """Exactly floor(tokens * share) tokens per choice, the remainder to the first group
    with a non-zero share (so empty groups stay empty), in a random order.
    (flextron.benchmarks.common.choices_for_mix gives the remainder to group 0.)"""
    counts = [int(tokens * s) for s in shares]
    counts[next(g for g, s in enumerate(shares) if s > 0)] += tokens - sum(counts)
    choice = torch.cat([torch.full((c,), g, dtype=torch.long) for g, c in enumerate(counts)])
    return choice[torch.randperm(tokens, generator=gen)].to(device)


def misaligned(t: torch.Tensor, elements: int = 3) -> torch.Tensor:
    """A contiguous copy of ``t`` whose storage starts ``elements`` elements in."""
    buf = torch.empty(t.numel() + elements, dtype=t.dtype, device=t.device)
    view = buf[elements:].view(t.shape)
    view.copy_(t)
    return view


def transposed(t: torch.Tensor) -> torch.Tensor:
    """The same values, laid out as ``c.t()`` of a contiguous ``c`` (how backward passes weights)."""
    return t.t().contiguous().t()


def op_case(
    fx: ModuleType,
    ref: ModuleType,
    op: str,
    dtype: torch.dtype,
    tokens: int,
    widths: list[int],
    shares: tuple[float, ...],
    cfg: Config,
    seed: int,
    layout: str = "plain",
) -> tuple[float, float]:
    """One nested GEMM vs the reference; ``layout`` is "plain", "misaligned" (both operands
    at storage offset +3) or "transposed" (the weight as ``w.t()`` of a contiguous tensor)."""
    gen = torch.Generator().manual_seed(seed)
    choice = make_choice(tokens, shares, cfg.device, gen)
    plan = fx.route_plan(choice, widths)
    a_shape, b_shape = ref.nested_operand_shapes(op, tokens, cfg.nested, cfg.other)
    dgen = torch.Generator(device=cfg.device).manual_seed(seed)
    a = torch.randn(a_shape, generator=dgen, device=cfg.device, dtype=torch.float64)
    b = torch.randn(b_shape, generator=dgen, device=cfg.device, dtype=torch.float64)
    a_low, b_low = a.to(dtype), b.to(dtype)
    if layout == "misaligned":
        a_in, b_in = misaligned(a_low), misaligned(b_low)
    elif layout == "transposed":
        a_in, b_in = a_low, transposed(b_low)
    else:
        a_in, b_in = a_low, b_low
    ours = getattr(fx, op)(a_in, b_in, plan.offsets, plan.widths)
    ref_fn = getattr(ref, op)
    return error_and_bound(
        ours, ref_fn(a_low, b_low, plan.offsets, widths), ref_fn(a, b, plan.offsets, widths)
    )


def mlp_params(cfg: Config, seed: int) -> dict[str, torch.Tensor]:
    """SwiGLU weights (fp64, scaled by 1/sqrt(fan-in) so fp16 does not overflow)."""
    gen = torch.Generator(device=cfg.device).manual_seed(seed)
    hidden, inner = cfg.mlp_hidden, cfg.nested

    def weight(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=cfg.device, dtype=torch.float64) / shape[-1] ** 0.5

    return {"w_up": weight(inner, hidden), "w_gate": weight(inner, hidden), "w_down": weight(hidden, inner)}


def mlp_case(
    fx: ModuleType,
    ref: ModuleType,
    dtype: torch.dtype,
    tokens: int,
    widths: list[int],
    cfg: Config,
    seed: int,
) -> list[tuple[str, float, float]]:
    """elastic_mlp forward and backward (output and the gradients of x and every weight)."""
    gen = torch.Generator().manual_seed(seed)
    choice = make_choice(tokens, MIXES["all"], cfg.device, gen)
    dgen = torch.Generator(device=cfg.device).manual_seed(seed + 1)
    x = torch.randn(tokens, cfg.mlp_hidden, generator=dgen, device=cfg.device, dtype=torch.float64)
    grad = torch.randn(tokens, cfg.mlp_hidden, generator=dgen, device=cfg.device, dtype=torch.float64)
    params = mlp_params(cfg, seed)

    def forward_backward(fn: Callable[..., torch.Tensor], to: torch.dtype) -> list[torch.Tensor]:
        leaves = {k: v.to(to).requires_grad_() for k, v in {"x": x, **params}.items()}
        out = fn(leaves["x"], choice, leaves["w_up"], leaves["w_down"], widths, "swiglu", leaves["w_gate"])
        out.backward(grad.to(to))
        return [out.detach()] + [leaves[k].grad for k in ("x", "w_up", "w_gate", "w_down")]

    ours = forward_backward(fx.elastic_mlp, dtype)
    low = forward_backward(ref.elastic_mlp, dtype)
    exact = forward_backward(ref.elastic_mlp, torch.float64)
    names = (".out", ".grad_x", ".grad_w_up", ".grad_w_gate", ".grad_w_down")
    return [
        (name, *error_and_bound(o, lo, ex)) for name, o, lo, ex in zip(names, ours, low, exact, strict=True)
    ]


def stream_case(
    fx: ModuleType,
    ref: ModuleType,
    op: str,
    dtype: torch.dtype,
    tokens: int,
    widths: list[int],
    cfg: Config,
    seed: int,
) -> tuple[float, float]:
    """The op on a non-default stream, with its inputs produced on that stream behind a
    long sleep: an op that launched on another stream would read them too early."""
    gen = torch.Generator().manual_seed(seed)
    choice = make_choice(tokens, MIXES["all"], cfg.device, gen)
    a_shape, b_shape = ref.nested_operand_shapes(op, tokens, cfg.nested, cfg.other)
    dgen = torch.Generator(device=cfg.device).manual_seed(seed)
    a = torch.randn(a_shape, generator=dgen, device=cfg.device, dtype=torch.float64)
    b = torch.randn(b_shape, generator=dgen, device=cfg.device, dtype=torch.float64)
    a_low, b_low = a.to(dtype), b.to(dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        if hasattr(torch.cuda, "_sleep"):
            torch.cuda._sleep(20_000_000)  # ~10 ms of GPU cycles
        a_in, b_in = a_low * 1, b_low * 1
        plan = fx.route_plan(choice, widths)
        ours = getattr(fx, op)(a_in, b_in, plan.offsets, plan.widths)
    torch.cuda.current_stream().wait_stream(side)
    ref_fn = getattr(ref, op)
    return error_and_bound(
        ours, ref_fn(a_low, b_low, plan.offsets, widths), ref_fn(a, b, plan.offsets, widths)
    )


def graph_case(
    fx: ModuleType, ref: ModuleType, dtype: torch.dtype, widths: list[int], cfg: Config, seed: int
) -> list[tuple[str, float, float]]:
    """Capture elastic_mlp (route_plan included) in a CUDA graph, then write new tokens and
    new choices into the captured input buffers and replay: the output must follow them."""
    tokens = cfg.graph_tokens
    gen = torch.Generator().manual_seed(seed)
    params = {k: v.to(dtype) for k, v in mlp_params(cfg, seed).items()}
    dgen = torch.Generator(device=cfg.device).manual_seed(seed)
    x_buf = torch.randn(tokens, cfg.mlp_hidden, generator=dgen, device=cfg.device).to(dtype)
    choice_buf = make_choice(tokens, MIXES["all"], cfg.device, gen)

    def mlp() -> torch.Tensor:
        return fx.elastic_mlp(x_buf, choice_buf, widths=widths, **params)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(2):
            mlp()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out_buf = mlp()
    results = []
    for k, shares in enumerate((MIXES["empty_middle"], (0.1, 0.2, 0.3, 0.4), MIXES["empty_first"])):
        x_new = torch.randn(tokens, cfg.mlp_hidden, generator=dgen, device=cfg.device, dtype=torch.float64)
        choice_new = make_choice(tokens, shares, cfg.device, gen)
        x_buf.copy_(x_new.to(dtype))
        choice_buf.copy_(choice_new)
        graph.replay()
        torch.cuda.synchronize()
        low = ref.elastic_mlp(x_buf, choice_new, widths=widths, **params)
        exact_params = {n: v.double() for n, v in params.items()}
        exact = ref.elastic_mlp(x_new, choice_new, widths=widths, **exact_params)
        results.append((f".replay{k + 1}", *error_and_bound(out_buf.clone(), low, exact)))
    return results


def run_sweep(sweep: Sweep, cfg: Config, fx: ModuleType, ref: ModuleType) -> None:
    """The special cases first (elastic_mlp, side stream, CUDA graph, layouts), then the
    sweep of dtypes x ops x token counts x width sets; cases past the budget are skipped."""
    on_gpu = cfg.device == "cuda"
    widths = cfg.width_sets["w4"]
    tokens = cfg.tokens[2] if len(cfg.tokens) > 2 else cfg.tokens[-1]
    seeds = itertools.count(1)
    for dtype_name, dtype in DTYPES.items():
        for mlp_tokens in cfg.mlp_tokens:
            case = Case("elastic_mlp.fwd_bwd", dtype_name, "elastic_mlp", mlp_tokens, widths)
            sweep.run(case, partial(mlp_case, fx, ref, dtype, mlp_tokens, widths, cfg, next(seeds)))
    for op in NESTED_OPS:
        case = Case(f"{op}.side_stream", "bfloat16", op, tokens, widths)
        if on_gpu:
            sweep.run(
                case, partial(stream_case, fx, ref, op, torch.bfloat16, tokens, widths, cfg, next(seeds))
            )
        else:
            sweep.skip(case, "needs CUDA (dry run)")
    for dtype_name in ("bfloat16", "float32"):
        case = Case("elastic_mlp.cuda_graph", dtype_name, "elastic_mlp", cfg.graph_tokens, widths)
        if on_gpu:
            sweep.run(case, partial(graph_case, fx, ref, DTYPES[dtype_name], widths, cfg, next(seeds)))
        else:
            sweep.skip(case, "needs CUDA (dry run)")
    for dtype_name, dtype in DTYPES.items():
        for op in NESTED_OPS:
            case = Case(f"{op}.misaligned+3", dtype_name, op, tokens, widths)
            shares = MIXES["all"]
            sweep.run(
                case,
                partial(op_case, fx, ref, op, dtype, tokens, widths, shares, cfg, next(seeds), "misaligned"),
            )
        for op in ("nested_linear_n", "nested_linear_k"):
            case = Case(f"{op}.weight_t", dtype_name, op, tokens, widths)
            sweep.run(
                case,
                partial(op_case, fx, ref, op, dtype, tokens, widths, shares, cfg, next(seeds), "transposed"),
            )
    for dtype_name, dtype in DTYPES.items():
        for op in NESTED_OPS:
            for n_tokens in cfg.tokens:
                for set_name, set_widths in cfg.width_sets.items():
                    for mix_name, shares in MIXES.items():
                        if set_name != "w4" and mix_name != "all":
                            continue  # the odd width set with every group populated only
                        case = Case(f"{op}.{set_name}.{mix_name}", dtype_name, op, n_tokens, set_widths)
                        body = partial(
                            op_case, fx, ref, op, dtype, n_tokens, set_widths, shares, cfg, next(seeds)
                        )
                        sweep.run(case, body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (no GPU needed)")
    parser.add_argument("--budget-s", type=float, default=60.0, help="skip the cases left after this many s")
    args = parser.parse_args(argv)
    cfg = DRY_CONFIG if args.dry_run else GPU_CONFIG
    if args.dry_run:
        torch.set_num_threads(1)  # tiny tensors: threads only contend
    sweep = Sweep(out=args.out, budget_s=args.budget_s, dry_run=args.dry_run, device=cfg.device)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        sweep.run(
            Case("cuda available", "-", "-", 0, []), lambda: _raise("torch.cuda.is_available() is False")
        )
    else:
        try:
            import flextron
            from flextron import reference
        except Exception as error:  # the extension may not import during development
            sweep.run(Case("import flextron", "-", "-", 0, []), lambda e=error: _raise(repr(e)))
        else:
            torch.manual_seed(0)
            run_sweep(sweep, cfg, flextron, reference)
    data = sweep.write()
    print(
        f"correctness: {data['ok_count']} ok, {data['fail_count']} failed, {data['skip_count']} skipped "
        f"in {data['elapsed_s']} s -> {args.out}"
    )
    return 0 if args.dry_run or data["fail_count"] == 0 else 1


def _raise(message: str) -> tuple[float, float]:
    raise RuntimeError(message)


if __name__ == "__main__":
    sys.exit(main())
