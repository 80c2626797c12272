"""Memory-safety checks of flextron's CUDA ops, for benchmarks/gpu_check.sh.

``--tiny``: a tiny bf16 elastic_mlp forward+backward (widths on the TMA path and widths
that are not) and every op once, including misaligned views; meant to run under
``compute-sanitizer --tool memcheck`` (exit status 1 on any error).

``--bad-offsets``: each bad ``offsets`` (offsets[G] < M, offsets[G] > M, decreasing,
offsets[0] != 0) for nested_linear_n / nested_linear_k / nested_weight_grad, every case in
its own subprocess (a device-side assert kills the CUDA context): caught = a non-zero exit
(a RuntimeError naming the offsets or a device-side assert, or a crash); NOT caught = the
op ran and the process exited 0. A case that hangs is reported as a timeout.

    python -m benchmarks.gpu_sanitizer --tiny [--dry-run]
    python -m benchmarks.gpu_sanitizer --bad-offsets [--out FILE.json] [--dry-run]

``--dry-run`` runs on the CPU (no GPU needed); with --bad-offsets, one case only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

BAD_OPS = ("nested_linear_n", "nested_linear_k", "nested_weight_grad")
# M = 64 rows in 3 groups; valid offsets are [0, 20, 40, 64].
VALID_OFFSETS = [0, 20, 40, 64]
BAD_OFFSETS = {
    "short": [0, 20, 40, 50],  # offsets[G] < M
    "long": [0, 20, 40, 80],  # offsets[G] > M
    "decreasing": [0, 40, 20, 64],
    "nonzero_start": [5, 20, 40, 64],
}
CASES = [f"{op}.{bad}" for op in BAD_OPS for bad in BAD_OFFSETS]
EXIT_CAUGHT, EXIT_OTHER_ERROR, EXIT_SETUP = 3, 4, 5


def operands(op: str, rows: int, nested: int, other: int, dtype: torch.dtype, device: str):
    """(a, b) of ``op(a, b, offsets, widths)`` for ``rows`` tokens."""
    import torch

    from flextron.reference import nested_operand_shapes

    shapes = nested_operand_shapes(op, rows, nested, other)
    return tuple(torch.randn(*s, device=device, dtype=torch.float32).to(dtype) for s in shapes)


def misaligned(t: torch.Tensor, elements: int = 3) -> torch.Tensor:
    import torch

    buf = torch.empty(t.numel() + elements, dtype=t.dtype, device=t.device)
    view = buf[elements:].view(t.shape)
    view.copy_(t)
    return view


class Tiny:
    """Runs ops once, printing ok / missing / ERROR per op and counting the errors."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.errors = 0

    def check(self, name: str, fn: Callable[[], object]) -> None:
        import torch

        try:
            fn()
            if self.device == "cuda":
                torch.cuda.synchronize()
            print(f"ok      {name}", flush=True)
        except AttributeError as error:  # an op this build does not have yet
            print(f"missing {name}: {error}", flush=True)
        except Exception as error:
            self.errors += 1
            print(f"ERROR   {name}: {type(error).__name__}: {error}"[:600], flush=True)

    def width_set(self, flextron: ModuleType, widths: list[int]) -> None:
        import torch

        device, dtype = self.device, torch.bfloat16
        tokens, hidden, inner = 37, 64, 128
        choice = torch.randint(0, len(widths), (tokens,), device=device)
        plan = flextron.route_plan(choice, widths)

        def weight(*shape: int) -> torch.Tensor:
            return (torch.randn(*shape, device=device) / shape[-1] ** 0.5).to(dtype).requires_grad_()

        x = torch.randn(tokens, hidden, device=device).to(dtype).requires_grad_()
        w_up, w_gate, w_down = weight(inner, hidden), weight(inner, hidden), weight(hidden, inner)
        scale = torch.rand(tokens, device=device).to(dtype).requires_grad_()

        def mlp() -> None:
            out = flextron.elastic_mlp(x, choice, w_up, w_down, widths, "swiglu", w_gate, scale=scale)
            out.float().square().sum().backward()

        self.check(f"elastic_mlp fwd+bwd widths={widths}", mlp)
        for op in ("nested_linear_n", "nested_linear_k", "nested_weight_grad", "nested_weight_grad_k"):
            a, b = operands(op, tokens, inner, hidden, dtype, device)
            self.check(f"{op} widths={widths}", partial(self.nested, flextron, op, a, b, plan))
            self.check(
                f"{op} misaligned+3 widths={widths}",
                partial(self.nested, flextron, op, misaligned(a), misaligned(b), plan),
            )
        h, gate = (torch.randn(tokens, inner, device=device).to(dtype) for _ in range(2))
        self.check(
            f"nested_activation swiglu widths={widths}",
            lambda: flextron.nested_activation(h, plan.offsets, plan.widths, "swiglu", gate),
        )
        self.check(
            f"nested_activation gelu widths={widths}",
            lambda: flextron.nested_activation(h, plan.offsets, plan.widths, "gelu"),
        )
        xs = torch.randn(tokens, hidden, device=device).to(dtype)
        self.check(
            f"permute+unpermute widths={widths}", lambda: flextron.unpermute(flextron.permute(xs, plan), plan)
        )

    @staticmethod
    def nested(flextron: ModuleType, op: str, a: torch.Tensor, b: torch.Tensor, plan: Any) -> torch.Tensor:
        return getattr(flextron, op)(a, b, plan.offsets, plan.widths)


def run_tiny(device: str) -> int:
    """Every op once on tiny shapes; returns the number of errors (a missing op is not one)."""
    import torch

    import flextron

    tiny = Tiny(device)
    for widths in ([128, 96, 64, 32], [72, 36, 12]):  # on the TMA path, and not
        tiny.width_set(flextron, widths)
    empty = torch.empty(0, dtype=torch.long, device=device)
    tiny.check("route_plan T=0", lambda: flextron.route_plan(empty, [64, 32]))
    print(f"tiny: {tiny.errors} error(s)")
    return tiny.errors


def run_case(name: str, device: str) -> int:
    """One bad-offsets case; the exit status says what happened (see the module doc)."""
    try:
        import torch

        import flextron

        op, bad = name.split(".")
        fn = getattr(flextron, op)
        offsets = torch.tensor(BAD_OFFSETS[bad], dtype=torch.int32, device=device)
        a, b = operands(op, VALID_OFFSETS[-1], 64, 32, torch.bfloat16, device)
    except Exception as error:
        print(f"setup failed: {type(error).__name__}: {error}")
        return EXIT_SETUP
    try:
        out = fn(a, b, offsets, [64, 32, 16])
        if device == "cuda":
            torch.cuda.synchronize()
        print(f"NOT caught: ran and returned {tuple(out.shape)}")
        return 0
    except RuntimeError as error:
        message = str(error)
        print(f"raised: {message.strip().splitlines()[0][:300]}")
        caught = "offsets" in message or "device-side assert" in message
        return EXIT_CAUGHT if caught else EXIT_OTHER_ERROR


def classify(name: str, device: str, timeout_s: float) -> dict[str, object]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--case", name, "--device", device],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return {
            "case": name,
            "verdict": "timeout (hang?)",
            "rc": None,
            "detail": f"no exit in {timeout_s:.0f} s",
        }
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    detail = next(
        (line for line in lines if line.startswith(("raised", "NOT", "setup"))), lines[-1] if lines else ""
    )
    verdict = {
        0: "NOT caught",
        EXIT_CAUGHT: "caught",
        EXIT_OTHER_ERROR: "caught (other error)",
        EXIT_SETUP: "error (setup)",
    }.get(proc.returncode, f"caught (crash, exit {proc.returncode})")
    seconds = round(time.perf_counter() - t0, 1)
    return {
        "case": name,
        "verdict": verdict,
        "rc": proc.returncode,
        "detail": detail[:300],
        "seconds": seconds,
    }


def run_bad_offsets(device: str, cases: list[str], out: Path | None, dry_run: bool, timeout_s: float) -> int:
    with ThreadPoolExecutor(max_workers=6) as pool:  # 6 CUDA contexts at a time
        results = list(pool.map(lambda name: classify(name, device, timeout_s), cases))
    for name in CASES:
        if name not in cases:
            results.append({"case": name, "verdict": "skipped (dry run)", "rc": None, "detail": ""})
    caught = sum(str(r["verdict"]).startswith("caught") for r in results)
    print(f"{'case':34s} {'verdict':28s} detail")
    for r in results:
        print(f"{r['case']:34s} {r['verdict']!s:28s} {r['detail']}")
    print(f"bad offsets: caught {caught}/{len(cases)} run ({len(CASES)} cases, device {device})")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        report = {"device": device, "dry_run": dry_run, "caught": caught, "run": len(cases), "cases": results}
        out.write_text(json.dumps(report, indent=1) + "\n")
    not_caught = [
        r for r in results if r["verdict"] in ("NOT caught",) or str(r["verdict"]).startswith("timeout")
    ]
    return 0 if dry_run or not not_caught else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--tiny", action="store_true", help="every op once on tiny shapes (for memcheck)")
    mode.add_argument("--bad-offsets", action="store_true", help="each bad-offsets case in a subprocess")
    mode.add_argument("--case", choices=CASES, help="one bad-offsets case (what --bad-offsets runs)")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda, or cpu with --dry-run")
    parser.add_argument("--out", type=Path, help="--bad-offsets: also write the results as JSON here")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU; --bad-offsets runs one case")
    parser.add_argument("--case-timeout-s", type=float, default=40.0, help="--bad-offsets: per case")
    args = parser.parse_args(argv)
    device = args.device or ("cpu" if args.dry_run else "cuda")
    if args.bad_offsets:  # the parent needs no torch: every case runs in its own process
        cases = CASES[:1] if args.dry_run else CASES
        return run_bad_offsets(device, cases, args.out, args.dry_run, args.case_timeout_s)
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device (use --dry-run on a machine without a GPU)")
    if device == "cpu":
        torch.set_num_threads(1)  # tiny tensors: threads only contend
    if args.case:
        return run_case(args.case, device)
    if args.dry_run:
        print("dry run: no GPU; the tiny pass runs on the CPU (no memcheck)")
    try:
        errors = run_tiny(device)
    except Exception as error:  # e.g. the extension does not import
        print(f"ERROR: {type(error).__name__}: {error}")
        return 0 if args.dry_run else 1
    return 0 if args.dry_run or errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
