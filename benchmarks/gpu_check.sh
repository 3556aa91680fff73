#!/usr/bin/env bash
# GPU check for a first run on an NVIDIA GPU (sized for an H200: under 6 minutes in all).
#   usage: bash benchmarks/gpu_check.sh OUTDIR        (from anywhere; no network needed)
# Steps, each under `timeout` with min(its own cap, the time left of GPU_CHECK_BUDGET_S, default 345 s):
#   build      pip install --no-build-isolation --no-deps -e . for this GPU's architecture only (GPU_CHECK_BUILD_S cap)
#   resources  cuobjdump --dump-resource-usage of the built extension (registers, shared memory, stack per kernel)
#   tests      the GPU tests only: pytest -m cuda (pytest-timeout per test, -rfE --durations=20, junit)
#   bench      h3fusion.bench.gpu_bench: moe_ffn with both GEMM backends vs transformers' grouped_mm and a dense mm
#   profile    torch.profiler top-20 kernels of one Mixtral-shape forward+backward per backend
#   sanitizer  benchmarks/sanitizer_case.py plainly, then under compute-sanitizer memcheck and racecheck
#              (PYTORCH_NO_CUDA_MEMORY_CACHING=1 so memcheck sees each allocation; --print-limit bounds the report)
# Outputs in OUTDIR (few files, so they fit a device run's return limits): gpu_check.log (everything printed),
# summary.json (rewritten before and after every step, so a run cut short still reports), bench.json (rewritten
# after every case), junit.xml, resources.txt, profile.txt, sanitizer.log.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
ROOT=$PWD
LOG="$OUT/gpu_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-345}
T0=$(date +%s)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
STEPS="$WORK/steps.tsv"   # name  status  rc  seconds  limit
: > "$STEPS"

# summary.json from $STEPS and $WORK/env.json, written atomically by h3fusion.utils.files (loaded by path: no
# package import, no torch, so it costs milliseconds).
cat > "$WORK/summary.py" <<'EOF'
import importlib.util, json, os, sys, time
spec = importlib.util.spec_from_file_location("files", os.path.join(sys.argv[1], "python/h3fusion/utils/files.py"))
files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(files)
work, out, t0 = sys.argv[2], sys.argv[3], int(sys.argv[4])
env = {}
if os.path.exists(os.path.join(work, "env.json")):
    with open(os.path.join(work, "env.json")) as f:
        env = json.load(f)
steps = []
with open(os.path.join(work, "steps.tsv")) as f:
    for line in f:
        name, status, rc, secs, limit = line.rstrip("\n").split("\t")
        steps.append({"step": name, "status": status, "rc": None if rc == "-" else int(rc),
                      "seconds": int(secs), "limit_s": int(limit)})
latest = {}
for s in steps:  # a step's last line wins (running -> ok/failed/timeout)
    latest[s["step"]] = s
summary = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "elapsed_s": int(time.time()) - t0,
           **env, "steps": list(latest.values()),
           "all_ok": bool(latest) and all(s["status"] in ("ok", "skipped") for s in latest.values())}
files.atomic_write_json(os.path.join(out, "summary.json"), summary)
EOF
write_summary() { "$PY" "$WORK/summary.py" "$ROOT" "$WORK" "$OUT" "$T0" || echo "(summary.json not written)"; }

left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
# run_step NAME MAX_SECONDS CMD...: runs CMD under min(MAX_SECONDS, time left); records its status before and after.
run_step() {
  local name=$1 max=$2; shift 2
  local l lim s rc d status
  l=$(left)
  lim=$(( max < l ? max : l ))
  if [ "$lim" -le 5 ]; then
    echo "== $name: SKIPPED (no time left)"
    printf '%s\tskipped\t-\t0\t0\n' "$name" >> "$STEPS"; write_summary; return 0
  fi
  local cmd="$*"
  echo "== $name (limit ${lim}s, $(( $(date +%s) - T0 ))s elapsed): ${cmd:0:300}"
  printf '%s\trunning\t-\t0\t%s\n' "$name" "$lim" >> "$STEPS"; write_summary
  s=$(date +%s)
  timeout --kill-after=10 "$lim" "$@"
  rc=$?
  d=$(( $(date +%s) - s ))
  case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
  echo "== $name: $status (rc=$rc) in ${d}s"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$d" "$lim" >> "$STEPS"; write_summary
  return 0
}

# ---- 0. what the machine has (recorded in summary.json) ----------------------------------------------------------
echo "h3fusion gpu_check $(date -u +%FT%TZ) on $(hostname), budget ${BUDGET}s"
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer /opt/nvidia/*/compute-sanitizer 2>/dev/null | head -1)
NVCC=$(command -v nvcc || ls /usr/local/cuda*/bin/nvcc 2>/dev/null | head -1)
CUOBJDUMP=$(command -v cuobjdump || ls /usr/local/cuda*/bin/cuobjdump 2>/dev/null | head -1)
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total,clocks.max.sm --format=csv || nvidia-smi || true
CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
[ -n "$CAP" ] || CAP=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
# this GPU only ("a" for Hopper, as CI's 9.0a); the full arch list is CI's job
case $CAP in 9.0) ARCH=9.0a ;; *) ARCH=$CAP ;; esac
export SAN NVCC ARCH
"$PY" - "$WORK/env.json" <<'EOF'
import json, os, subprocess, sys
def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as exc:  # noqa: BLE001
        return f"unavailable: {exc}"
import torch
env = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
       "compute_capability": "%d.%d" % torch.cuda.get_device_capability() if torch.cuda.is_available() else None,
       "arch_list": os.environ["ARCH"], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
       "python": sys.version.split()[0],
       # the C++ compilers: .cpp files build with $CXX; nvcc's host compiler (-ccbin) is $CXX too (setup.py), else $CC
       "CC": os.environ.get("CC"), "CXX": os.environ.get("CXX"),
       "cxx_version": sh(f"{os.environ.get('CXX') or 'c++'} --version | head -1"),
       "cc_version": sh(f"{os.environ.get('CC') or 'cc'} --version | head -1"),
       "driver": sh("nvidia-smi --query-gpu=driver_version --format=csv,noheader"),
       "nvcc": sh(f"{os.environ.get('NVCC') or 'nvcc'} --version | tail -2"),
       "compute_sanitizer": sh(f"{os.environ.get('SAN') or 'compute-sanitizer'} --version | tail -1")}
try:
    import transformers
    env["transformers"] = transformers.__version__
except ImportError:
    env["transformers"] = None
json.dump(env, open(sys.argv[1], "w"))
print(json.dumps(env, indent=1))
EOF
write_summary

# ---- 1. build for this GPU only ---------------------------------------------------------------------------------
export TORCH_CUDA_ARCH_LIST=$ARCH H3FUSION_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
# One attempt: a second build after a failed one only doubles the time (the first GPU run lost its budget so).
# Compiler lines are printed (-v) so that the host compiler nvcc used (-ccbin) is on record.
build() { "$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e .; }
run_step build ${GPU_CHECK_BUILD_S:-200} bash -c "$(declare -f build); PY=$PY build && $PY -c 'import h3fusion_ext as h; assert h.has_cuda_kernels(); print(\"CUDA kernels: yes\")'"
export PYTHONPATH="$ROOT:$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"

# ---- 2. registers / shared memory / stack per kernel ----------------------------------------------------------
resources() {
  local so
  so=$(ls h3fusion_ext/_C*.so 2>/dev/null | head -1)  # the editable / in-place build puts it here
  [ -n "$so" ] || so=$("$PY" -c "import h3fusion_ext._C as c; print(c.__file__)") || return 1
  echo "# cuobjdump --dump-resource-usage $so" > "$OUT/resources.txt"
  "${CUOBJDUMP:-cuobjdump}" --dump-resource-usage "$so" >> "$OUT/resources.txt" || return 1
  grep -c "Function" "$OUT/resources.txt" | sed 's/^/kernels: /'
  grep -E "STACK:[1-9]|LOCAL:[1-9]" "$OUT/resources.txt" | head -20 | sed 's/^/uses stack or local memory: /'
  return 0
}
run_step resources 20 bash -c "$(declare -f resources); PY=$PY OUT=$OUT CUOBJDUMP=$CUOBJDUMP resources"

# ---- 3. the GPU tests ----------------------------------------------------------------------------------------------
# only files that mark GPU tests (collecting the whole suite would import the training stack for nothing)
mapfile -t CUDA_TESTS < <(grep -rlE "mark\.cuda|pytestmark = pytest\.mark\.cuda" tests --include='test_*.py' | sort)
echo "GPU test files: ${CUDA_TESTS[*]}"
PYTEST_EXTRA=()
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_EXTRA=(--timeout=45) || echo "pytest-timeout missing: no per-test limit"
# 4 workers share the GPU: the tests are small, their CPU-side references dominate
"$PY" -c "import xdist" 2>/dev/null && PYTEST_EXTRA+=(-n 4)
run_step tests 90 "$PY" -m pytest "${CUDA_TESTS[@]}" -m cuda -q -p no:cacheprovider --continue-on-collection-errors \
  "${PYTEST_EXTRA[@]}" -rfE --durations=20 --junitxml="$OUT/junit.xml"

# ---- 4. benchmarks: both backends vs transformers' grouped_mm and a dense mm (bench.json after every case) -------
bench_budget=$(( $(left) > 110 ? 40 : 20 ))
run_step bench 65 "$PY" -m h3fusion.bench.gpu_bench --out "$OUT/bench.json" --budget-s "$bench_budget"

# ---- 5. profiler kernel tables --------------------------------------------------------------------------------
run_step profile 25 "$PY" -m h3fusion.bench.gpu_bench --profile "$OUT/profile.txt"

# ---- 6. sanitizer: once plainly, then memcheck and racecheck -----------------------------------------------------
: > "$OUT/sanitizer.log"
# sanitize TOOL CASE_ARGS SANITIZER_ARGS...: compute-sanitizer on the small case (sanitizer_case.py --small CASE_ARGS),
# its report appended to sanitizer.log
sanitize() {
  local tool=$1 case_args=$2; shift 2
  echo "### compute-sanitizer --tool $tool $* (case: --small $case_args)" >> "$OUT/sanitizer.log"
  # shellcheck disable=SC2086  # case_args is a list of words
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" --error-exitcode 3 --print-limit 20 "$@" \
    "$PY" benchmarks/sanitizer_case.py --small $case_args 2>&1 | tee -a "$OUT/sanitizer.log"
}
run_step sanitizer_plain 25 bash -c "set -o pipefail; $PY benchmarks/sanitizer_case.py 2>&1 | tee -a '$OUT/sanitizer.log'"
if [ -n "$SAN" ]; then
  run_step memcheck 45 bash -c "set -o pipefail; $(declare -f sanitize); PY=$PY SAN=$SAN OUT=$OUT sanitize memcheck \"\" --leak-check no"
  # racecheck only our kernels (names in namespace h3fusion): torch's CUTLASS kernels are not ours to fix
  # and only the "own" GEMM mode: racecheck died inside torch's CUTLASS grouped GEMM on an H200 (sanitizer_case.py)
  run_step racecheck 40 bash -c "set -o pipefail; $(declare -f sanitize); PY=$PY SAN=$SAN OUT=$OUT sanitize racecheck \"--modes own\" --kernel-name kns=h3fusion"
else
  echo "== compute-sanitizer not found" | tee -a "$OUT/sanitizer.log"
  printf 'memcheck\tmissing\t-\t0\t0\nracecheck\tmissing\t-\t0\t0\n' >> "$STEPS"; write_summary
fi

write_summary
echo "gpu_check finished in $(( $(date +%s) - T0 ))s; outputs in $OUT:"
ls -la "$OUT"
