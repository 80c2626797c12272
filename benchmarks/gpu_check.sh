#!/usr/bin/env bash
# The GPU check: one command for a lent H200 (or any Hopper machine with nvcc and a CUDA torch),
# finished in at most 7 minutes, every stage under its own `timeout`:
#   1 build     python3 setup.py build_ext --inplace for sm_90a (+ compile times from .ninja_log,
#               register/spill use from `cuobjdump -res-usage` of the built extension)
#   2 tests     the CUDA tests only (pytest -m cuda, pytest-timeout per test)
#   3 correctness  benchmarks/gpu_correctness.py: dtypes x ops x T x widths vs fp64 references
#   4 profile   benchmarks/gpu_profile.py: which kernels one elastic MLP step runs
#   5 bench     benchmarks/gpu_bench.py: nested GEMMs and elastic MLP vs cuBLAS / loops
#   6 sanitizer benchmarks/gpu_sanitizer.py: compute-sanitizer memcheck + bad offsets
#   7 suites    `flextron bench --suite nested_linear|elastic_mlp|elastic_attention|elastic_model|token_routing`
# and leaves EXACTLY these 8 files in $OUT (or ./gpu-results; anything else there is removed):
#   summary.txt build.log tests.log correctness.json bench.json profile.txt sanitizer.log
#   results.tgz (everything else: full logs, the suites' JSON and plots, cuobjdump output).
# A stage that did not run still leaves its file, saying why.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run  # anywhere (CI): no build, the GPU stages run their
#                                           # --dry-run on tiny CPU tensors, in about a minute
#
# Offline machines: put the wheels it lacks in .whl/ beforehand (installed with no deps into
# /tmp/flextron-site): `bash scripts/gpu_wheels.sh` fetches the pinned nvidia-cutlass.
# Environment: OUT, PYTHON (default python3), GPU_CHECK_TOTAL_S (default 420; dry run 150).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
repo=$(pwd -P)
dry_run=0
for arg in "$@"; do
  case $arg in
    --dry-run) dry_run=1 ;;
    -h | --help) sed -n '2,23p' "$0" && exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (--dry-run or nothing)" >&2 && exit 2 ;;
  esac
done
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
result_files=(summary.txt build.log tests.log correctness.json bench.json profile.txt sanitizer.log results.tgz)

out_dir="${OUT:-$repo/gpu-results}"
mkdir -p "$out_dir" && out_dir=$(cd "$out_dir" && pwd -P) || exit 2
case "$repo/" in "$out_dir"/*)
  echo "gpu_check.sh: refusing OUT=$out_dir: it holds the repository, and the check empties OUT" >&2
  exit 2
  ;;
esac
if [ "$out_dir" = / ] || [ "$out_dir" = "$(cd ~ && pwd -P)" ]; then
  echo "gpu_check.sh: refusing OUT=$out_dir: the check empties OUT" >&2
  exit 2
fi
if [ -n "$(ls -A "$out_dir")" ] && [ -n "$(timeout 10 git -C "$out_dir" ls-files 2>/dev/null | head -1)" ]; then
  echo "gpu_check.sh: refusing OUT=$out_dir: it holds files tracked by git, and the check empties OUT" >&2
  exit 2
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/flextron-gpu-check.XXXXXX") || exit 2
mkdir -p "$work/logs" "$work/suites"

# Time plan: every stage's limit is its cap, cut to what is left before the deadline.
if ((dry_run)); then total_s=${GPU_CHECK_TOTAL_S:-150}; else total_s=${GPU_CHECK_TOTAL_S:-420}; fi
pack_s=15 # kept for packing the results
t_start=$(date +%s)
deadline=$((t_start + total_s - pack_s))
dry_flag=()
((dry_run)) && dry_flag=(--dry-run)

record() { # name status seconds limit note
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5//$'\t'/ }" >>"$work/stages.tsv"
}
skip_stage() { # name file reason
  echo "not run: $3" >>"$work/$2"
  record "$1" skipped 0 - "$3"
  echo "== $1: skipped ($3)"
}
stage_begin() { # name cap file [min seconds]: sets stage, limit, stage_file; 1 = out of time
  stage=$1
  stage_file="$work/$3"
  local left=$((deadline - $(date +%s)))
  limit=$(($2 < left ? $2 : left))
  if ((limit < ${4:-10})); then
    skip_stage "$1" "$3" "out of time (${left} s left of the ${total_s} s check)"
    return 1
  fi
  stage_t0=$(date +%s)
  echo "== $1 (limit ${limit} s)"
}
stage_end() { # exit status [note] [optional: a timeout is "partial", not a failure]
  local status seconds=$(($(date +%s) - stage_t0))
  case $1 in
    0) status=pass ;;
    124 | 137) if [ -n "${3:-}" ]; then status=partial; else status=timeout; fi ;;
    *) status="fail(rc=$1)" ;;
  esac
  record "$stage" "$status" "$seconds" "$limit" "${2:-}"
  echo "   $stage: $status in $seconds s${2:+ ($2)}"
}
worst_rc() { # the exit statuses of a stage's steps -> one: a timeout first, then any failure
  local rc first=0
  for rc in "$@"; do
    case $rc in 124 | 137) echo 124 && return ;; esac
    ((first == 0)) && first=$rc
  done
  echo "$first"
}
last_line() { grep -v '^\s*$' "$1" 2>/dev/null | tail -1 | cut -c1-120; }

pack() { # on EXIT: exactly the 8 result files in $out_dir, whatever happened
  local rc=$? f status
  trap - EXIT INT TERM
  for f in build.log tests.log profile.txt sanitizer.log; do
    [ -s "$work/$f" ] || echo "not run: the check stopped before this stage (exit $rc)" >>"$work/$f"
    if (($(wc -c <"$work/$f") > 1500000)); then # keep the result file small; the whole log goes in results.tgz
      mv "$work/$f" "$work/logs/$f.full"
      { head -300 "$work/logs/$f.full"; echo "... (trimmed: the whole log is logs/$f.full in results.tgz) ..."
        tail -1500 "$work/logs/$f.full"; } | cut -c1-1000 >"$work/$f"
    fi
  done
  for f in correctness bench; do # valid JSON, or a stub saying why not
    if ! timeout 20 "$py" -c 'import json, sys; json.load(open(sys.argv[1]))' "$work/$f.json" 2>/dev/null; then
      [ -e "$work/$f.json" ] && mv "$work/$f.json" "$work/logs/$f.json.not-json"
      status=$(awk -F'\t' -v s="$f" '$1 == s {print $2 ": " $5}' "$work/stages.tsv" 2>/dev/null | tail -1)
      timeout 20 "$py" -c 'import json, sys
print(json.dumps({"not_run": sys.argv[1], "dry_run": sys.argv[2] == "1", "ok_count": 0, "fail_count": 0,
                  "cases": [], "rows": [], "headline": {}}))' \
        "${status:-the check stopped before this stage (exit $rc)}" "$dry_run" >"$work/$f.json" 2>/dev/null ||
        echo '{"not_run": "the check stopped before this stage", "cases": [], "rows": []}' >"$work/$f.json"
    fi
  done
  timeout 30 "$py" - "$work" "$dry_run" "$total_s" "$(($(date +%s) - t_start))" >"$work/summary.txt" 2>"$work/logs/summary.err" <<'PY'
"""summary.txt: one screen from the stage files (no torch import)."""
import json
import pathlib
import sys
import time

work, dry, total, elapsed = pathlib.Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3], sys.argv[4]


def read(name):
    path = work / name
    return path.read_text(errors="replace") if path.exists() else ""


def load(name):
    try:
        return json.loads(read(name))
    except ValueError:
        return {}


env = load("env.json")
kv = dict(line.split(": ", 1) for line in read("env.txt").splitlines() if ": " in line)
out = []
out.append("flextron GPU check" + (" -- DRY RUN: no GPU; build skipped; the GPU stages ran --dry-run" if dry else ""))
out.append(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}  commit {kv.get('commit', 'unknown')}  {elapsed} s (budget {total} s)")
out.append(f"torch {env.get('torch', '?')} (CUDA {env.get('torch_cuda', '?')})  nvcc {kv.get('nvcc') or '?'}  driver {kv.get('driver') or '?'}")
if env.get("gpu"):
    out.append(f"GPU {env['gpu']}  {env.get('sm_count')} SMs  {env.get('memory_gib')} GiB  sm_{env.get('capability')}")
else:
    out.append(f"GPU: none (torch.cuda.is_available() is {env.get('cuda_available')}; nvidia-smi: {kv.get('gpu') or 'none'})")
fx = env.get("flextron")
if fx:
    out.append(f"flextron: archs {fx.get('cuda_archs')} sm90 {fx.get('with_sm90')} nested_weight_grad_k {fx.get('nested_weight_grad_k')} set_dense_rows_limit {fx.get('set_dense_rows_limit')}")
else:
    out.append(f"flextron does not import: {str(env.get('flextron_error', '?'))[:150]}")
out.append("")
out.append(f"{'stage':16}{'status':14}{'s':>5}{'limit':>7}  note")
for row in read("stages.tsv").splitlines():
    name, status, seconds, limit, note = (row.split("\t") + [""] * 5)[:5]
    out.append(f"{name:16}{status:14}{seconds:>5}{limit:>7}  {note.split(' -> ')[0][:90]}")
out.append("")
c = load("correctness.json")
if c.get("cases"):
    out.append(f"correctness: {c.get('ok_count')} ok, {c.get('fail_count')} failed, {c.get('skip_count', 0)} skipped")
    for case in [x for x in c["cases"] if x.get("ok") is False][:3]:
        why = case.get("error") or f"error {case.get('max_error')} > bound {case.get('bound')}"
        out.append(f"  FAIL {case['name']} {case['dtype']} T={case['T']}: {str(why)[:100]}")
elif c.get("not_run"):
    out.append(f"correctness: not run: {c['not_run']}")
profile = read("profile.txt").splitlines()
out += ["profile " + line[:150] for line in profile if line.startswith(("families[", "WARNING", "dry run", "not run"))]
sanitizer = read("sanitizer.log").splitlines()
keep = ("tiny:", "bad offsets:", "========= ERROR SUMMARY", "compute-sanitizer not", "not run", "ERROR")
out += ["sanitizer " + line[:150] for line in sanitizer if line.startswith(keep)][:6]
b = load("bench.json")
rows = b.get("rows", [])
if rows or b.get("headline"):
    errors = [r for r in rows if "error" in r]
    out.append(f"bench: {len(rows)} rows ({len(errors)} with errors), {len(b.get('skipped_rows', []))} skipped past the budget; targets reported, not asserted")
    if errors:
        out.append(f"  first error ({errors[0].get('kind')}): {errors[0]['error'][:120]}")
    unmeasured = []
    for key, value in b.get("headline", {}).items():
        if isinstance(value, dict) and "target" in value:
            if value.get("value") is None:
                unmeasured.append(key)
                continue
            met = {True: "met", False: "NOT met", None: "n/a"}[value.get("met")]
            out.append(f"  {key}: {value['value']} (target {value['target']}: {met})")
        elif value is not None:
            out.append(f"  {key}: {json.dumps(value)[:140]}")
    if unmeasured:
        out.append(f"  not measured: {', '.join(unmeasured)}"[:200])
elif b.get("not_run"):
    out.append(f"bench: not run: {b['not_run']}")
print("\n".join(out))
PY
  if [ ! -s "$work/summary.txt" ]; then
    { echo "flextron GPU check$( ((dry_run)) && echo ' -- dry run')"; echo "(the summary script failed: see results.tgz logs/summary.err)"; cat "$work/stages.tsv"; } >"$work/summary.txt"
  fi
  for f in "${result_files[@]}"; do
    [ "$f" = results.tgz ] || mv -f "$work/$f" "$out_dir/$f"
  done
  tar -czf "$out_dir/results.tgz" -C "$work" . 2>/dev/null || tar -czf "$out_dir/results.tgz" -T /dev/null
  for f in "$out_dir"/* "$out_dir"/.[!.]* "$out_dir"/..?*; do
    [ -e "$f" ] || [ -L "$f" ] || continue
    case " ${result_files[*]} " in *" $(basename "$f") "*) ;; *) rm -rf -- "$f" ;; esac
  done
  rm -rf -- "$work"
  echo
  cat "$out_dir/summary.txt"
  echo "results: $out_dir ($(ls "$out_dir" | wc -l) files)"
  exit "$rc"
}
trap pack EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- environment ---------------------------------------------------------------------------
if ((dry_run)); then
  echo "== dry run: no build; the extension built in place is used if it imports"
else
  if ls .whl/*.whl >/dev/null 2>&1; then
    echo "== installing .whl/*.whl into /tmp/flextron-site" | tee -a "$work/build.log"
    timeout 120 "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/flextron-site .whl/*.whl \
      >>"$work/build.log" 2>&1 || echo "wheel install failed (exit $?)" | tee -a "$work/build.log"
    export PYTHONPATH="/tmp/flextron-site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
{
  echo "commit: $(timeout 10 git rev-parse --short HEAD 2>/dev/null || echo unknown)$(
    n=$(timeout 10 git status --porcelain 2>/dev/null | wc -l) && ((n > 0)) && echo " (+$n uncommitted)")"
  smi=$(timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
  echo "gpu: ${smi%%,*}"
  echo "driver: $(echo "$smi" | cut -d, -f2 | tr -d ' ')"
  nvcc_bin=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
  echo "nvcc: $(timeout 20 "$nvcc_bin" --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
  echo "host: $(hostname) $(nproc) cores"
} >"$work/env.txt" 2>/dev/null
timeout 20 nvidia-smi >"$work/logs/nvidia-smi.txt" 2>&1 || echo "nvidia-smi: not available" >>"$work/logs/nvidia-smi.txt"

# ---- 1 build -------------------------------------------------------------------------------
if ((dry_run)); then
  echo "dry run: build skipped (no GPU); the extension built in place is used if it imports" >>"$work/build.log"
  record build skipped 0 - "dry run"
elif stage_begin build 240 build.log; then
  FLEXTRON_CUDA_ARCHS="${FLEXTRON_CUDA_ARCHS:-90a}" FLEXTRON_REQUIRE_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" \
    timeout -k 10 "$limit" "$py" setup.py build_ext --inplace >>"$stage_file" 2>&1
  rc=$?
  stage_end $rc "$(last_line "$stage_file")"
fi
export PYTHONPATH="$repo/python:$repo${PYTHONPATH:+:$PYTHONPATH}"
{
  echo
  echo "== compile times in s, slowest first (.ninja_log)"
  ninja_log=$(find build -name .ninja_log 2>/dev/null | head -1)
  if [ -n "$ninja_log" ]; then
    echo "($ninja_log)"
    awk -F'\t' '!/^#/ && NF >= 4 {t[$4] = ($2 - $1) / 1000} END {for (f in t) printf "%8.1f  %s\n", t[f], f}' \
      "$ninja_log" | sort -rn | head -40
  else
    echo "no .ninja_log under build/"
  fi
  echo
  echo "== ptxas register/spill lines of the build"
  grep -E 'ptxas info|spill' "$work/build.log" | head -300 || echo "(none: the build does not pass -Xptxas -v)"
  echo
  echo "== cuobjdump -res-usage of the extension (full output in results.tgz logs/res-usage.txt)"
  so=$(ls python/flextron/_C*.so 2>/dev/null | head -1)
  cuobjdump_bin=$(command -v cuobjdump || ls /usr/local/cuda/bin/cuobjdump 2>/dev/null)
  if [ -z "$so" ]; then
    echo "no python/flextron/_C*.so: skipped"
  elif [ -z "$cuobjdump_bin" ]; then
    echo "cuobjdump not found (PATH, /usr/local/cuda/bin): skipped"
  else
    timeout 60 "$cuobjdump_bin" -res-usage "$so" >"$work/logs/res-usage.txt" 2>&1
    echo "cuobjdump exit $?"
    # One line per kernel (arch, registers, stack, local memory, shared memory, name), most
    # stack/local first: STACK or LOCAL > 0 means spills or local arrays.
    awk '/^arch = / {arch = $3}
      /Function [^ ]*:/ {fn = $2; sub(/:$/, "", fn)}
      /REG:/ {
        delete v
        for (i = 1; i <= NF; i++) { split($i, kv, ":"); v[kv[1]] = kv[2] + 0 }
        printf "%-8s REG %3d STACK %5d LOCAL %5d SHARED %6d  %s\n", arch, v["REG"], v["STACK"], v["LOCAL"], v["SHARED"], substr(fn, 1, 140)
      }' "$work/logs/res-usage.txt" >"$work/logs/res-usage-table.txt"
    awk '{n++; if ($3 > max) max = $3; if ($5 > 0 || $7 > 0) spill++}
      END {printf "%d kernels; %d with STACK or LOCAL > 0; max REG %d\n", n, spill, max}' "$work/logs/res-usage-table.txt"
    sort -k5,5nr -k7,7nr -k3,3nr "$work/logs/res-usage-table.txt" | head -200
  fi
} >"$work/logs/build-report.txt" 2>&1
cat "$work/logs/build-report.txt" >>"$work/build.log"

timeout 60 "$py" - "$work/env.json" >"$work/logs/probe.log" 2>&1 <<'PY'
"""Versions, the GPU, and whether flextron imports (and with which ops)."""
import importlib.util
import json
import sys

info = {"pytest_timeout": importlib.util.find_spec("pytest_timeout") is not None}
try:
    import torch

    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sm_count=p.multi_processor_count, capability=f"{p.major}{p.minor}",
                    memory_gib=round(p.total_memory / 2**30, 1))
except Exception as error:
    info["torch_error"] = repr(error)
try:
    import flextron
    from flextron import _library

    info["flextron"] = {
        "file": flextron.__file__, "with_cuda": _library.WITH_CUDA, "with_sm90": _library.WITH_SM90,
        "cuda_archs": list(_library.CUDA_ARCHS),
        "nested_weight_grad_k": hasattr(flextron, "nested_weight_grad_k"),
        "set_dense_rows_limit": hasattr(_library._C, "set_dense_rows_limit"),
    }
except Exception as error:
    info["flextron_error"] = f"{type(error).__name__}: {error}"
with open(sys.argv[1], "w") as f:
    json.dump(info, f, indent=1)
print(json.dumps(info))
PY
ext_error=""
grep -q '"flextron"' "$work/env.json" 2>/dev/null || ext_error="flextron does not import (see build.log; results.tgz env.json)"
pytest_timeout=(--timeout=60)
grep -q '"pytest_timeout": true' "$work/env.json" 2>/dev/null || pytest_timeout=()

# ---- 2 CUDA tests --------------------------------------------------------------------------
if ((dry_run)); then
  skip_stage tests tests.log "dry run: no GPU; the CUDA tests (pytest -m cuda) need one"
elif [ -n "$ext_error" ]; then
  skip_stage tests tests.log "$ext_error"
elif stage_begin tests 90 tests.log; then
  ((${#pytest_timeout[@]})) || echo "pytest-timeout is not installed: no per-test limit" >>"$stage_file"
  timeout -k 10 "$limit" "$py" -m pytest -q -p no:cacheprovider -m cuda "${pytest_timeout[@]}" tests >>"$stage_file" 2>&1
  rc=$?
  stage_end $rc "$(last_line "$stage_file")"
fi

# In the dry run the GPU stages run anyway (on the CPU): their scripts record a missing
# extension per case. On the GPU, a build that does not import skips them.
gpu_stage_blocked() { # name file: 0 (and the stage is skipped) when flextron does not import
  if ((!dry_run)) && [ -n "$ext_error" ]; then
    skip_stage "$1" "$2" "$ext_error"
    return 0
  fi
  return 1
}

# ---- 3 correctness -------------------------------------------------------------------------
if ! gpu_stage_blocked correctness correctness.json && stage_begin correctness 75 correctness.json; then
  timeout -k 10 "$limit" "$py" -m benchmarks.gpu_correctness --out "$stage_file" --budget-s $((limit * 3 / 4)) \
    "${dry_flag[@]}" >"$work/logs/correctness.log" 2>&1
  rc=$?
  stage_end $rc "$(last_line "$work/logs/correctness.log")"
fi

# ---- 4 profile -----------------------------------------------------------------------------
if ! gpu_stage_blocked profile profile.txt && stage_begin profile 60 profile.txt; then
  timeout -k 10 "$limit" "$py" -m benchmarks.gpu_profile --out "$stage_file" "${dry_flag[@]}" \
    >"$work/logs/profile.log" 2>&1
  rc=$?
  [ -s "$stage_file" ] || cp "$work/logs/profile.log" "$stage_file"
  stage_end $rc
fi

# ---- 5 benchmarks (leaving the sanitizer its time) ----------------------------------------
sanitizer_cap=80
((dry_run)) && sanitizer_cap=40
left=$((deadline - $(date +%s) - sanitizer_cap))
bench_budget=$((left - 30 < 150 ? left - 30 : 150))
((dry_run)) && bench_budget=10
((bench_budget < 15)) && bench_budget=15
if ! gpu_stage_blocked bench bench.json && stage_begin bench $((bench_budget + 30)) bench.json; then
  timeout -k 10 "$limit" "$py" -m benchmarks.gpu_bench --out "$stage_file" --budget-s "$bench_budget" \
    "${dry_flag[@]}" >"$work/logs/bench.log" 2>&1
  rc=$?
  stage_end $rc "$(grep '^gpu_bench:' "$work/logs/bench.log" | cut -c1-100)"
fi

# ---- 6 sanitizer ---------------------------------------------------------------------------
if ! gpu_stage_blocked sanitizer sanitizer.log && stage_begin sanitizer "$sanitizer_cap" sanitizer.log; then
  memcheck_limit=$((limit > 60 ? limit - 30 : limit / 2))
  if ((dry_run)); then
    echo "dry run: no GPU; compute-sanitizer not run; --tiny and one --bad-offsets case run on the CPU" >>"$stage_file"
    timeout -k 5 "$memcheck_limit" "$py" -m benchmarks.gpu_sanitizer --tiny --dry-run >>"$stage_file" 2>&1
    rc_tiny=$?
  else
    sanitizer_bin=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
    if [ -n "$sanitizer_bin" ]; then
      # Memory errors only: API errors that torch handles itself would fail the exit status.
      api_errors=()
      timeout 20 "$sanitizer_bin" --help 2>/dev/null | grep -q -- --report-api-errors && api_errors=(--report-api-errors no)
      echo "== compute-sanitizer --tool memcheck ${api_errors[*]}: gpu_sanitizer --tiny (no caching allocator)" >>"$stage_file"
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 10 "$memcheck_limit" "$sanitizer_bin" --tool memcheck \
        --error-exitcode 1 "${api_errors[@]}" "$py" -m benchmarks.gpu_sanitizer --tiny >>"$stage_file" 2>&1
      rc_tiny=$?
    else
      echo "compute-sanitizer not found (PATH, /usr/local/cuda/bin): memcheck not run; --tiny runs bare" >>"$stage_file"
      timeout -k 10 "$memcheck_limit" "$py" -m benchmarks.gpu_sanitizer --tiny >>"$stage_file" 2>&1
      rc_tiny=$?
    fi
  fi
  echo "== bad offsets: gpu_sanitizer --bad-offsets (each case in its own process)" >>"$stage_file"
  stage_left=$((stage_t0 + limit - $(date +%s)))
  timeout -k 5 "$((stage_left > 5 ? stage_left : 5))" "$py" -m benchmarks.gpu_sanitizer --bad-offsets "${dry_flag[@]}" \
    --out "$work/logs/bad-offsets.json" >>"$stage_file" 2>&1
  rc_bad=$?
  stage_end "$(worst_rc "$rc_tiny" "$rc_bad")" "tiny exit $rc_tiny, bad offsets exit $rc_bad"
fi

# ---- 7 the `flextron bench` suites, while time remains (their JSON/PNGs go in results.tgz) --
for suite_cap in nested_linear:75 elastic_mlp:75 elastic_attention:90 elastic_model:45 token_routing:60; do
  suite=${suite_cap%%:*}
  if ((dry_run)); then
    record "suite-$suite" skipped 0 - "dry run"
  elif [ -n "$ext_error" ]; then
    record "suite-$suite" skipped 0 - "$ext_error"
  elif stage_begin "suite-$suite" "${suite_cap##*:}" "logs/bench-$suite.log" 30; then
    timeout -k 10 "$limit" "$py" -m flextron.cli bench --suite "$suite" --device cuda --out "$work/suites/$suite" \
      >>"$stage_file" 2>&1
    stage_end $? "" optional
  fi
done

# The exit status: 1 if a stage failed or timed out (the EXIT trap packs the results).
awk -F'\t' '$2 ~ /^(fail|timeout)/ {bad = 1} END {exit bad}' "$work/stages.tsv"
