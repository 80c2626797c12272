#!/usr/bin/env bash
# The test command of the README: set up (scripts/setup.sh), lint and check formatting (ruff,
# clang-format), then run the test suite.
# CUDA tests skip without a GPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check python tests benchmarks
.venv/bin/ruff format --check python tests benchmarks
find csrc -type f \( -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' \) -print0 |
  xargs -0 .venv/bin/clang-format --dry-run --Werror
.venv/bin/python -m pytest -q "$@"
