"""The extension was built the way it says: with CUDA kernels holding sm_90a code when CUDA
was built (mandatory in CI, where FLEXTRON_REQUIRE_CUDA=1)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import flextron
from flextron import _C

REQUIRE_CUDA = os.environ.get("FLEXTRON_REQUIRE_CUDA", "0") not in ("", "0")
CUDA_SOURCES = sorted(p.stem for p in (Path(__file__).parents[1] / "csrc" / "cuda").glob("*.cu"))


def _find_cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    candidates = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "cuobjdump"]
    try:  # triton (a torch dependency) bundles one
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    return next((str(c) for c in candidates if c.is_file()), None)


def test_cuda_build_when_required():
    if REQUIRE_CUDA:
        assert flextron.WITH_CUDA, "FLEXTRON_REQUIRE_CUDA=1 but the extension was built without CUDA"
        assert "90a" in flextron.CUDA_ARCHS and flextron.WITH_SM90


@pytest.mark.skipif(not flextron.WITH_CUDA, reason="built without CUDA kernels")
def test_extension_holds_sm90a_code_for_every_cuda_source():
    cuobjdump = _find_cuobjdump()
    if cuobjdump is None:
        if REQUIRE_CUDA:
            pytest.fail("cuobjdump not found (CUDA toolkit bin/, PATH or triton's bundle)")
        pytest.skip("cuobjdump not found")
    listing = subprocess.run(
        [cuobjdump, "--list-elf", _C.__file__], check=True, capture_output=True, text=True
    ).stdout
    cubins = {line.split(":")[-1].strip() for line in listing.splitlines() if "ELF file" in line}
    for arch in flextron.CUDA_ARCHS:
        arch_sources = CUDA_SOURCES if arch == "90a" else [s for s in CUDA_SOURCES if "sm90" not in s]
        for source in arch_sources:
            assert f"{source}.sm_{arch}.cubin" in cubins, f"{source} has no sm_{arch} code: {sorted(cubins)}"


def _cuobjdump(*flags: str) -> str:
    cuobjdump = _find_cuobjdump()
    if cuobjdump is None:
        if REQUIRE_CUDA:
            pytest.fail("cuobjdump not found (CUDA toolkit bin/, PATH or triton's bundle)")
        pytest.skip("cuobjdump not found")
    return subprocess.run([cuobjdump, *flags, _C.__file__], check=True, capture_output=True, text=True).stdout


# What --use_fast_math (or -ftz/-prec-div=false) puts in PTX: approximate tanh, sin, cos, lg2
# and sqrt, fast fp32 division, and flush-to-zero fp32 arithmetic. (The IEEE expf keeps an
# ex2.approx after its own range reduction: that one is intended.)
FAST_MATH_PTX = re.compile(
    r"\b(?:tanh\.approx|sin\.approx|cos\.approx|lg2\.approx|sqrt\.approx|div\.approx\.f32|"
    r"div\.full\.f32|(?:add|sub|mul|fma\.rn)\.ftz\.f32)\b"
)


@pytest.mark.skipif(not flextron.WITH_CUDA, reason="built without CUDA kernels")
def test_ptx_has_no_fast_math():
    """fp32 GELU-tanh and SiLU on the GPU must match the CPU and the reference (an approximate
    tanh misses by ~5e-4)."""
    ptx = _cuobjdump("--dump-ptx")
    assert ".entry" in ptx, "no PTX in the extension"
    found = sorted(set(FAST_MATH_PTX.findall(ptx)))
    assert not found, f"approximate or flush-to-zero fp32 instructions in the PTX: {found}"


@pytest.mark.skipif(not flextron.WITH_CUDA, reason="built without CUDA kernels")
def test_no_kernel_spills_registers():
    """Every kernel of every architecture: no stack frame and no local memory (register
    spills land there), per the resource usage ptxas recorded."""
    usage = _cuobjdump("--dump-resource-usage")
    function, offenders, kernels = None, [], 0
    for line in usage.splitlines():
        if line.strip().startswith("Function "):
            function = line.strip()[len("Function ") :].rstrip(":")
        match = re.search(r"STACK:(\d+).*LOCAL:(\d+)", line)
        if match:
            kernels += 1
            if int(match.group(1)) or int(match.group(2)):
                offenders.append((function, match.group(0)))
    assert kernels > 0, "no resource usage found"
    assert not offenders, offenders
