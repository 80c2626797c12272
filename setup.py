"""Build flextron's native extension (flextron._C) with CMake + Ninja.

Environment knobs:
  FLEXTRON_CPU_ONLY=1          build without CUDA kernels even when nvcc and a CUDA torch exist
  FLEXTRON_CUDA_ARCHS="90a;80" CUDA architectures (";" or "," separated)
  CUTLASS_DIR=/path/to/cutlass CUTLASS source tree instead of the nvidia-cutlass package
  FLEXTRON_BUILD_DIR=build/... CMake build directory (kept between builds: rebuilds are incremental)
  MAX_JOBS=N                   parallel compile jobs (default: number of CPUs)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def _fail(message: str) -> None:
    sys.stderr.write(f"\nflextron build error: {message}\n\n")
    raise SystemExit(1)


def _find_nvcc() -> str | None:
    candidates = [os.environ.get("CUDACXX")]
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home:
        candidates.append(str(Path(cuda_home) / "bin" / "nvcc"))
    # The toolkit's own nvcc before PATH: a wrapper script on PATH hides where the toolkit is.
    candidates += ["/usr/local/cuda/bin/nvcc", shutil.which("nvcc")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def _cuda_build_settings() -> tuple[bool, str | None, str]:
    """Decide whether to build CUDA kernels: torch must have CUDA and nvcc must exist."""
    archs = os.environ.get("FLEXTRON_CUDA_ARCHS", "90a;80").replace(",", ";")
    required = os.environ.get("FLEXTRON_REQUIRE_CUDA", "0") not in ("", "0")
    if os.environ.get("FLEXTRON_CPU_ONLY", "0") not in ("", "0"):
        if required:
            _fail("FLEXTRON_CPU_ONLY=1 and FLEXTRON_REQUIRE_CUDA=1 contradict each other")
        print("flextron: FLEXTRON_CPU_ONLY=1; building the CPU kernels only")
        return False, None, archs
    import torch

    reason = None
    nvcc = _find_nvcc()
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} has no CUDA"
    elif nvcc is None:
        reason = "nvcc was not found (set CUDA_HOME or CUDACXX)"
    if reason is not None:
        if required:
            _fail(f"FLEXTRON_REQUIRE_CUDA=1 but {reason}")
        print(f"flextron: {reason}; building the CPU kernels only")
        return False, None, archs
    print(f"flextron: building the CUDA kernels with {nvcc} for {archs}")
    return True, nvcc, archs


def _tool(name: str, bin_dir_attribute: str) -> str:
    """The build tool from its PyPI package in this environment (a system one may be too old),
    else from PATH."""
    try:
        module = __import__(name)
        candidate = Path(getattr(module, bin_dir_attribute)) / name
        if candidate.is_file():
            return str(candidate)
    except (ImportError, AttributeError):
        pass
    found = shutil.which(name)
    if found is None:
        _fail(f"{name} not found: pip install {name}")
    return found


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        try:
            import pybind11
            import torch
        except ImportError as error:
            _fail(
                f"{error}. Install the build requirements first "
                "(pip install torch pybind11 cmake ninja nvidia-cutlass) and build with "
                "`pip install --no-build-isolation .`"
            )
        cmake = _tool("cmake", "CMAKE_BIN_DIR")
        ninja = _tool("ninja", "BIN_DIR")
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            _fail("no C++ compiler found (set CXX or install g++)")

        with_cuda, nvcc, archs = _cuda_build_settings()
        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(
            os.environ.get("FLEXTRON_BUILD_DIR", ROOT / "build" / ("cmake-cuda" if with_cuda else "cmake-cpu"))
        ).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)

        cmake_args = [
            "-G",
            "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path};{pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('FLEXTRON_BUILD_TYPE', 'Release')}",
            f"-DFLEXTRON_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
            f"-DFLEXTRON_CUDA_ARCHS={archs}",
        ]
        if os.environ.get("CUTLASS_DIR"):
            cmake_args.append(f"-DCUTLASS_DIR={os.environ['CUTLASS_DIR']}")
        if nvcc:
            toolkit = Path(nvcc).resolve().parent.parent
            cmake_args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCUDA_TOOLKIT_ROOT_DIR={toolkit}"]
            # Torch's CMake config finds the toolkit through CUDA_HOME and builds its own
            # -gencode list from TORCH_CUDA_ARCH_LIST (we replace it per target anyway).
            os.environ.setdefault("CUDA_HOME", str(toolkit))
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))

        subprocess.run([cmake, str(ROOT), *cmake_args], cwd=build_dir, check=True)
        subprocess.run([cmake, "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


setup(
    ext_modules=[CMakeExtension("flextron._C")],
    cmdclass={"build_ext": CMakeBuild},
)
