#!/usr/bin/env bash
# Fetches the wheels the GPU check needs on an offline GPU machine into .whl/ (git-ignored):
# the pinned CUTLASS headers (requirements-dev.txt). The machine's own Python packages
# (torch, transformers, pytest, hypothesis, pytest-timeout) are not fetched.
#   bash scripts/gpu_wheels.sh   # then carry .whl to the GPU machine and run benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
pin=$(grep -E '^nvidia-cutlass==' requirements-dev.txt)
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d .whl "$pin"
ls -l .whl
