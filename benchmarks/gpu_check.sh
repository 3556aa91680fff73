#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU, build from source, run the CUDA tests, run compute-sanitizer
# (memcheck + racecheck) on a small forward+backward, run the benchmark runner; write everything under OUTDIR.
#   usage: bash benchmarks/gpu_check.sh OUTDIR
# Must finish within 10 minutes on an H100: every step runs under its own time limit, taken from what is left.
# Outputs (few files, so they fit a device run's return limits): OUTDIR/gpu_check.log (everything printed),
# OUTDIR/summary.json (per-step status and timings), OUTDIR/bench.json (benchmark runner), OUTDIR/junit.xml.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
LOG="$OUT/gpu_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-570}
T0=$(date +%s)
STEPS=()

left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
# run_step NAME MAX_SECONDS CMD...: runs CMD under min(MAX_SECONDS, time left), records status and seconds.
run_step() {
  local name=$1 max=$2; shift 2
  local l; l=$(left)
  local lim=$(( max < l ? max : l ))
  if [ "$lim" -le 5 ]; then echo "== $name: SKIPPED (no time left)"; STEPS+=("$name skipped 0"); return 0; fi
  echo "== $name (limit ${lim}s): $*"
  local s; s=$(date +%s)
  timeout --kill-after=10 "$lim" "$@"
  local rc=$?
  local d=$(( $(date +%s) - s ))
  echo "== $name: rc=$rc in ${d}s"
  STEPS+=("$name $rc $d")
  return 0
}

echo "h3fusion gpu_check $(date -u +%FT%TZ) on $(hostname)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

# 1. build from source, for this GPU's architecture only (the full arch list is CI's job)
ARCH=$($PY -c "import torch; m,n=torch.cuda.get_device_capability(); print(f'{m}.{n}' + ('a' if m == 9 else ''))")
export TORCH_CUDA_ARCH_LIST=$ARCH H3FUSION_CUDA=1 H3FUSION_EXPECT_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
build() {
  $PY -m pip install --no-build-isolation --no-deps -e . && $PY -c "import h3fusion_ext" && return 0
  echo "pip install -e failed; falling back to an in-place build"
  $PY setup.py build_ext --inplace
}
run_step build 300 bash -c "$(declare -f build); PY=$PY build"
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import h3fusion_ext; print('CUDA kernels compiled in:', h3fusion_ext.has_cuda_kernels())"

# 2. the extension tests (CUDA ones included; CPU ones are quick), with a junit report for the summary
run_step ext_tests 200 $PY -m pytest -q tests/h3fusion_ext tests/test_build.py tests/h3fusion/test_moe_block.py -p no:cacheprovider \
  --junitxml="$OUT/junit.xml"

# 3. compute-sanitizer on a small forward+backward of every op
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$SAN" ]; then
  run_step memcheck 90 "$SAN" --tool memcheck --error-exitcode 3 --leak-check no $PY benchmarks/sanitizer_case.py
  run_step racecheck 90 "$SAN" --tool racecheck --error-exitcode 3 $PY benchmarks/sanitizer_case.py --small
else
  echo "== compute-sanitizer not found"; STEPS+=("memcheck missing 0" "racecheck missing 0")
fi

# 4. the benchmark runner
run_step bench 200 $PY -m benchmarks.run --device cuda --out "$OUT/bench.json"

# 5. summary
printf '%s\n' "${STEPS[@]}" | $PY -c "
import json, sys, time, torch
steps = []
for line in sys.stdin.read().split(chr(10)):
    if line.strip():
        name, rc, secs = line.split()
        steps.append({'step': name, 'rc': rc, 'seconds': int(secs), 'ok': rc == '0'})
summary = {'date': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()), 'device': torch.cuda.get_device_name(0),
           'torch': torch.__version__, 'arch': '$ARCH', 'steps': steps, 'all_ok': all(s['ok'] for s in steps)}
json.dump(summary, open('$OUT/summary.json', 'w'), indent=2)
print(json.dumps(summary, indent=2))
"
echo "gpu_check finished in $(( $(date +%s) - T0 ))s"
