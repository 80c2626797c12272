#!/usr/bin/env bash
# The GPU check: one command for a lent H200 (or any Hopper machine with nvcc and a CUDA
# torch). Builds flextron for sm_90a, runs the whole test suite (CUDA tests included) and
# the benchmarks (`flextron bench`: kernels, attention, model), and writes logs + JSON + plots
# under $OUT (or ./gpu-results). Sized to finish in about 8 minutes on 16 cores (build ~2,
# tests ~1, benchmark suites <= 4.75, gate+up fusion probe <= 0.4), inside a 10-minute call.
#
# Offline machines: put the wheels it lacks in .whl/ beforehand (all are installed, no deps):
#   pip download --no-deps --only-binary=:all: -d .whl nvidia-cutlass
# and, for the Hugging Face tests, transformers and its pure-Python/cp312 dependencies
# (tokenizers, huggingface_hub, safetensors, regex, ...) for the machine's Python.
# Then commit $OUT's JSON/plot under benchmarks/results/<date>-<device>/.
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir="${OUT:-$PWD/gpu-results}"
mkdir -p "$out_dir"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

if ls .whl/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/flextron-site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/flextron-site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out_dir/device.txt" 2>&1
"$py" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" >>"$out_dir/device.txt" 2>&1

echo "== build (log: build.log)"
start=$(date +%s)
if ! FLEXTRON_CUDA_ARCHS="${FLEXTRON_CUDA_ARCHS:-90a}" FLEXTRON_REQUIRE_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" \
  "$py" setup.py build_ext --inplace >"$out_dir/build.log" 2>&1; then
  tail -40 "$out_dir/build.log"
  exit 1
fi
echo "built in $(($(date +%s) - start)) s"
export PYTHONPATH="$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== tests (log: tests.log)"
"$py" -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$out_dir/tests.log" | tail -15
tests_status=${PIPESTATUS[0]}

# Each benchmark rewrites its JSON after every row: a suite cut by its time limit keeps its rows.
bench() {  # suite, time limit (s)
  echo "== $1 benchmarks (log: bench-$1.log)"
  timeout "$2" "$py" -m flextron.cli bench --suite "$1" --device cuda --out "$out_dir" 2>&1 |
    tee "$out_dir/bench-$1.log" | tail -30
  return "${PIPESTATUS[0]}"
}
bench kernels 150; kernels_status=$?
bench attention 90; attention_status=$?
bench model 45; model_status=$?
echo "== gate+up fusion probe (log: gate-up-probe.log)"
timeout 25 "$py" -m benchmarks.gate_up_fusion_probe --device cuda --out "$out_dir" >"$out_dir/gate-up-probe.log" 2>&1
echo "tests exit $tests_status; benchmarks exit: kernels $kernels_status, attention $attention_status, model $model_status"
exit $((tests_status || kernels_status || attention_status || model_status))
