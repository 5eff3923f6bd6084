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
# Steps: environment, kernel_tests, kernel_bench, e2e (GPT-3 1.3B training steps at seq 2048,
# bf16, Triton kernels vs PyTorch/SDPA: tokens/s and MFU; see docs/performance.md).
# Adding a check: write a function
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

step_e2e() {
    # GPU end-to-end check (issue 8): GPT-3 1.3B (configs/model/gpt3-1.3b.yaml) at seq 2048,
    # bf16, one GPU, micro-batch 8, 2 warm-up + 4 timed optimizer steps through the trainer's
    # DeepSpeed engine (megalm.perf.worker), with model.kernels=triton and =torch (SDPA).
    # Prints tokens/s and MFU (6*N_mm + 12*L*T*d, dense bf16 peak) of both; goal MFU >= 50%.
    local data="$OUT/e2e_data" steps=4
    [[ -n "${GPU_CHECK_QUICK:-}" ]] && steps=2
    if [[ ! -f "$data/shards/manifest.json" ]]; then
        "$PY" -m data_tools.stdlib_corpus --output "$data/raw" --max-mb 2 &&
            "$PY" -m data_tools.train_tokenizer --input "$data/raw" --vocab-size 4096 --output "$data/tok" &&
            "$PY" -m data_tools.preprocess --input "$data/raw" --tokenizer "$data/tok" \
                --output "$data/shards" --workers 4 --val-fraction 0.01 >/dev/null || return 1
    fi
    "$PY" -m megalm.perf.presets --config configs/tiny.yaml --model configs/model/gpt3-1.3b.yaml \
        --out "$OUT/e2e_config.yaml" >/dev/null || return 1
    local rc=0 kernels
    for kernels in triton torch; do
        TRITON_INTERPRET=0 "$PY" -m megalm.perf.worker --config "$OUT/e2e_config.yaml" \
            --out "$OUT/e2e_$kernels" --steps "$steps" --warmup 2 \
            data.dir="$data/shards" run.dir="$OUT/e2e_run_$kernels" model.kernels=$kernels \
            precision.dtype=bf16 training.micro_batch=8 training.global_batch=8 zero.stage=0 || rc=1
    done
    "$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = {k: json.loads((out / f"e2e_{k}" / "result.json").read_text()) for k in ("triton", "torch")
        if (out / f"e2e_{k}" / "result.json").exists()}
for k, r in rows.items():
    if r.get("status") != "ok":
        print(f"e2e {k}: {r.get('status')}: {r.get('error')}")
        continue
    goal = "ok" if r["mfu"] >= 0.5 else "MISS"
    print(f"e2e {k:<6}: {r['tokens_per_s']:>9,.0f} tok/s  MFU {r['mfu']:.1%} ({goal}, goal >= 50%)  "
          f"HFU {r['hfu']:.1%}  step {r['step_s'] * 1e3:.0f} ms (fwd {r['forward_s'] * 1e3:.0f}, "
          f"bwd {r['backward_s'] * 1e3:.0f}, opt {r['optimizer_s'] * 1e3:.0f})  peak {r['peak_mem_gb']:.1f} GB")
ok = [r for r in rows.values() if r.get("status") == "ok"]
if ok:
    print("formula:", ok[0]["formula"])
if len(ok) == 2:
    print(f"e2e triton / torch tokens/s = {rows['triton']['tokens_per_s'] / rows['torch']['tokens_per_s']:.3f}")
PYEOF
    return $rc
}

STEPS=(environment kernel_tests kernel_bench e2e)
declare -A STEP_TIMEOUT=([environment]=60 [kernel_tests]=200 [kernel_bench]=270 [e2e]=240)
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
