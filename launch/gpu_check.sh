#!/usr/bin/env bash
# One-shot GPU check for megalm: run it when a GPU is lent (device status:
# can_start_another true). Budget: under 8 minutes on one H200.
#
#   launch/gpu_check.sh                 # every step
#   launch/gpu_check.sh kernel_bench    # only the named steps
#   GPU_CHECK_QUICK=1 launch/gpu_check.sh   # smaller benchmark sizes
#
# Without CUDA it runs the CPU dry run of the benchmarks and exits 0.
# Results land in $GPU_CHECK_OUT (default runs/gpu_check/<UTC time>/): one log per
# step, bench_kernels.json, summary.txt. Copy the numbers into docs/performance.md.
#
# Adding a check (e.g. the 1.3B end-to-end training run): write a function
# step_<name> below that returns non-zero on failure, give it a time cap in
# STEP_TIMEOUT, and append <name> to STEPS. Keep the total under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=${GPU_CHECK_OUT:-runs/gpu_check/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"

if [[ "$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null)" != 1 ]]; then
    echo "gpu_check: no CUDA device; running the CPU dry run of launch/bench_kernels.py only"
    "$PY" launch/bench_kernels.py --dry-run --json "$OUT/bench_kernels_dry_run.json"
    exit $?
fi

# --- steps -------------------------------------------------------------------
step_environment() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
}

step_kernel_tests() {
    # Compiled kernels (TRITON_INTERPRET=0) at moderate sizes, bf16, head dims 64/128.
    TRITON_INTERPRET=0 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/kernels
}

step_kernel_bench() {
    local quick=()
    [[ -n "${GPU_CHECK_QUICK:-}" ]] && quick=(--quick)
    TRITON_INTERPRET=0 "$PY" launch/bench_kernels.py "${quick[@]}" --json "$OUT/bench_kernels.json"
}

STEPS=(environment kernel_tests kernel_bench)
declare -A STEP_TIMEOUT=([environment]=60 [kernel_tests]=200 [kernel_bench]=270)
# -----------------------------------------------------------------------------

if (($# > 0)); then STEPS=("$@"); fi
for fn in $(declare -F | awk '$3 ~ /^step_/ {print $3}'); do export -f "$fn"; done
export PY OUT

failed=()
start_all=$SECONDS
for step in "${STEPS[@]}"; do
    if ! declare -F "step_$step" >/dev/null; then
        echo "gpu_check: unknown step '$step'" | tee -a "$OUT/summary.txt"
        failed+=("$step")
        continue
    fi
    cap=${STEP_TIMEOUT[$step]:-300}
    echo "=== $step (cap ${cap}s) ==="
    t0=$SECONDS
    timeout --kill-after=10 "$cap" bash -c "step_$step" 2>&1 | tee "$OUT/$step.log"
    rc=${PIPESTATUS[0]}
    status=ok
    if ((rc == 124)); then status="TIMEOUT after ${cap}s"; elif ((rc != 0)); then status="FAILED rc=$rc"; fi
    [[ $status == ok ]] || failed+=("$step")
    echo "$step: $status ($((SECONDS - t0))s)" | tee -a "$OUT/summary.txt"
done
echo "total: $((SECONDS - start_all))s; results in $OUT" | tee -a "$OUT/summary.txt"
if ((${#failed[@]})); then
    echo "gpu_check: failed steps: ${failed[*]}"
    exit 1
fi
