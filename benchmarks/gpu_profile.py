"""Which kernels run: torch.profiler over one elastic_mlp forward+backward, for gpu_check.sh.

Profiles one bf16 SwiGLU elastic_mlp step (T=4096, H=4096, D=14336, widths 100/75/50/25%,
uniform mix) after a warm-up step and writes the top kernels by CUDA time (name, calls,
total ms) as text, then the kernel families seen (our CUTLASS grouped GEMM, the SIMT
fallback ``masked_gemm_kernel``, ``nested_activation_kernel``, cuBLAS GEMMs, copies, ...)
for bf16 and, on a smaller T, fp16 and fp32: a silent fallback or a stray copy shows here.

    python -m benchmarks.gpu_profile --out profile.txt [--dry-run]

``--dry-run`` profiles a tiny step on the CPU (CPU ops instead of kernels; no GPU needed).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

# (family, pattern) in the order tried: the first match names a kernel's family.
FAMILIES = (
    ("simt_masked_gemm", re.compile(r"masked_gemm_kernel")),
    ("nested_activation", re.compile(r"nested_activation")),
    ("cublas_gemm", re.compile(r"nvjet|xmma|cutlass3x|cutlass_80|cublas|Kernel2<", re.I)),
    ("cutlass_grouped", re.compile(r"GemmUniversal|GroupProblemShape|device_kernel<")),
    ("flextron_other", re.compile(r"flextron|route_plan|permute|gather|scatter", re.I)),
    ("cublas_gemm", re.compile(r"gemm", re.I)),
    ("copy_or_fill", re.compile(r"copy|memcpy|memset|fill|CatArrayBatched|cast", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|reduce|silu|mul", re.I)),
)


def family(name: str) -> str:
    return next((fam for fam, pattern in FAMILIES if pattern.search(name)), "other")


@dataclass
class Kernel:
    name: str
    calls: int
    total_ms: float


def widths_for(inner: int) -> list[int]:
    return [inner, inner * 3 // 4, inner // 2, inner // 4]


def profile_step(
    device: str, dtype: torch.dtype, tokens: int, hidden: int, inner: int
) -> tuple[list[Kernel], float]:
    """Kernels (on the CPU: ops) of one elastic_mlp forward+backward, by self time, and
    the wall time of the profiled step in ms."""
    import flextron  # here: the extension may not import while it is being edited

    gen = torch.Generator(device=device).manual_seed(0)
    widths = widths_for(inner)
    counts = [tokens // 4] * 4
    counts[0] += tokens - sum(counts)
    choice = torch.cat([torch.full((c,), g, dtype=torch.long) for g, c in enumerate(counts)])
    choice = choice[torch.randperm(tokens)].to(device)

    def leaf(*shape: int, scale: float = 1.0) -> torch.Tensor:
        t = torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale
        return t.to(dtype).requires_grad_()

    x = leaf(tokens, hidden)
    w_up, w_gate = leaf(inner, hidden, scale=hidden**-0.5), leaf(inner, hidden, scale=hidden**-0.5)
    w_down = leaf(hidden, inner, scale=inner**-0.5)
    grad = torch.randn(tokens, hidden, generator=gen, device=device, dtype=torch.float32).to(dtype)

    def step() -> None:
        out = flextron.elastic_mlp(x, choice, w_up, w_down, widths, "swiglu", w_gate)
        out.backward(grad)

    step()  # warm-up: first-call setup and autotuning stay out of the profile
    on_gpu = device == "cuda"
    if on_gpu:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        step()
        if on_gpu:
            torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3
    kernels = []
    for avg in prof.key_averages():
        if on_gpu:
            if getattr(avg, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue
            us = getattr(avg, "self_device_time_total", None) or getattr(avg, "self_cuda_time_total", 0)
        else:
            us = avg.self_cpu_time_total
        if us > 0:
            kernels.append(Kernel(avg.key, avg.count, us / 1e3))
    kernels.sort(key=lambda k: k.total_ms, reverse=True)
    return kernels, wall_ms


def families_line(label: str, kernels: list[Kernel]) -> str:
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for k in kernels:
        totals[family(k.name)][0] += k.calls
        totals[family(k.name)][1] += k.total_ms
    parts = [
        f"{fam}={int(c)}x/{ms:.3f}ms" for fam, (c, ms) in sorted(totals.items(), key=lambda kv: -kv[1][1])
    ]
    return f"families[{label}]: " + (" ".join(parts) if parts else "(none)")


def warnings_for(label: str, kernels: list[Kernel]) -> list[str]:
    out = []
    simt = [k for k in kernels if family(k.name) == "simt_masked_gemm"]
    if simt:
        calls = sum(k.calls for k in simt)
        out.append(
            f"WARNING[{label}]: SIMT fallback masked_gemm_kernel ran {calls}x ({sum(k.total_ms for k in simt):.3f} ms)"
        )
    copies = [k for k in kernels if family(k.name) == "copy_or_fill"]
    if copies:
        calls = sum(k.calls for k in copies)
        out.append(f"note[{label}]: copy/fill kernels: {calls}x, {sum(k.total_ms for k in copies):.3f} ms")
    return out


def short(name: str, width: int = 150) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the text file to write")
    parser.add_argument("--dry-run", action="store_true", help="a tiny step on the CPU (no GPU needed)")
    parser.add_argument("--top", type=int, default=25, help="kernels listed (default 25)")
    args = parser.parse_args(argv)
    if args.dry_run:
        torch.set_num_threads(1)
        device, tokens, hidden, inner, small_tokens = "cpu", 64, 32, 128, 16
        lines = ["dry run: no GPU; CPU ops of a tiny step, not CUDA kernels"]
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device (use --dry-run on a machine without a GPU)")
        device, tokens, hidden, inner, small_tokens = "cuda", 4096, 4096, 14336, 1024
        lines = []
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    lines.append(f"device: {device_name}, torch {torch.__version__} (CUDA {torch.version.cuda})")
    families, status = [], 0
    for dtype, n_tokens in (
        (torch.bfloat16, tokens),
        (torch.float16, small_tokens),
        (torch.float32, small_tokens),
    ):
        label = str(dtype).removeprefix("torch.")
        header = (
            f"elastic_mlp forward+backward, {label}, T={n_tokens}, H={hidden}, D={inner}, "
            f"widths {widths_for(inner)}, uniform mix"
        )
        try:
            kernels, wall_ms = profile_step(device, dtype, n_tokens, hidden, inner)
        except Exception as error:  # recorded: the next dtype still runs
            lines += ["", header, f"ERROR: {type(error).__name__}: {error}"[:800]]
            families.append(f"families[{label}]: ERROR {type(error).__name__}")
            status = 1
            continue
        families.append(families_line(label, kernels))
        families += warnings_for(label, kernels)
        if dtype != torch.bfloat16:
            continue  # the full table for bf16 only
        total = sum(k.total_ms for k in kernels)
        unit = "kernel" if device == "cuda" else "CPU op (self)"
        lines += [
            "",
            header,
            f"total {unit} time {total:.3f} ms over {sum(k.calls for k in kernels)} calls "
            f"({len(kernels)} distinct); profiled step wall time {wall_ms:.1f} ms",
            f"top {args.top} by {unit} time:",
            f"{'total_ms':>10} {'calls':>6} {'share':>6}  family             name",
        ]
        for k in kernels[: args.top]:
            share = k.total_ms / total if total else 0.0
            lines.append(
                f"{k.total_ms:10.3f} {k.calls:6d} {share:6.1%}  {family(k.name):18s} {short(k.name)}"
            )
    lines += ["", *families]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-8:]))
    return 0 if args.dry_run else status


if __name__ == "__main__":
    sys.exit(main())
