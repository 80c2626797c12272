#!/usr/bin/env bash
# The test command of the README: set up (scripts/setup.sh), lint, then run the test suite.
# CUDA tests skip without a GPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check python tests benchmarks
.venv/bin/python -m pytest -q "$@"
