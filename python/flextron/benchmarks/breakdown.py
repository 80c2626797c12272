"""Where a forward pass spends its time, by kind of work: routing (route_plan, permute,
unpermute), nested GEMMs, dense GEMMs (static widths), the activation, core attention, the
LM head and the rest (norms, RoPE, residuals, slicing, Python). Read from a torch.profiler
trace of a few calls: each profiled op counts under the first of its ancestors (or itself)
that has a kind, so nothing is counted twice (a nested GEMM's BLAS calls are the nested
GEMM's). On the CPU the times are the ops' wall time on the host; on a GPU their kernels'
device time.

The profiler adds overhead to every op, so the absolute times are above an unprofiled
run's; the benchmarks report the kinds' shares of the profiled time and scale them to the
time measured without the profiler.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

KINDS = ("routing", "nested_gemm", "dense_gemm", "activation", "attention", "lm_head", "other")

_KIND_OF = {
    "flextron::route_plan": "routing",
    "flextron::permute": "routing",
    "flextron::unpermute": "routing",
    "flextron::nested_linear_n": "nested_gemm",
    "flextron::nested_linear_k": "nested_gemm",
    "flextron::nested_activation": "activation",
    "aten::linear": "dense_gemm",
    "aten::mm": "dense_gemm",
    "aten::addmm": "dense_gemm",
    "aten::matmul": "dense_gemm",
    "aten::scaled_dot_product_attention": "attention",
    "lm_head": "lm_head",
}


def kind_of(name: str) -> str | None:
    if "flex_attention" in name:
        return "attention"
    return _KIND_OF.get(name)


def breakdown(
    fn: Callable[[], object], device: str, lm_head: nn.Module | None = None, calls: int = 3
) -> dict[str, float]:
    """Milliseconds per call of each kind in ``KINDS`` (plus ``"total"``), from ``calls``
    profiled calls of ``fn`` after one warm-up call. ``lm_head``: a module whose calls count
    as the LM head (marked with a profiler range while profiling)."""
    cuda = torch.device(device).type == "cuda"
    fn()
    hooks = _mark(lm_head, "lm_head") if lm_head is not None else []
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:
        with profile(activities=activities) as trace:
            for _ in range(calls):
                fn()
            if cuda:
                torch.cuda.synchronize(device)
    finally:
        for hook in hooks:
            hook.remove()
    times = dict.fromkeys(KINDS, 0.0)
    total = 0.0
    for event in trace.events():
        if event.cpu_parent is None:  # a top-level op: the total is theirs
            total += _time(event, cuda)
        kind = kind_of(event.name)
        if kind is not None and not _has_kind_ancestor(event):
            times[kind] += _time(event, cuda)
    times["other"] = max(total - sum(times.values()), 0.0)
    return {kind: ms / calls for kind, ms in {**times, "total": total}.items()}


def _time(event, cuda: bool) -> float:
    return (event.device_time_total if cuda else event.cpu_time_total) / 1e3


def _has_kind_ancestor(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if kind_of(parent.name) is not None:
            return True
        parent = parent.cpu_parent
    return False


def _mark(module: nn.Module, name: str) -> list:
    """Forward hooks that open a profiler range named ``name`` around ``module``'s calls."""
    ranges: list = []

    def enter(*_):
        ranges.append(record_function(name))
        ranges[-1].__enter__()

    def leave(*_):
        ranges.pop().__exit__(None, None, None)

    return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
