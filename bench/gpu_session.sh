#!/usr/bin/env bash
# Everything that needs a GPU, as ONE command that fits a 15-minute device window with the machine's
# start-up: at most BUDGET_S (default 480 s = 8 min) of wall time, stages in order of decision value,
# each skipped when the time left is less than its estimate, and each run under `timeout` so that
# none can overrun the budget. Rows and logs land in $OUT as they are produced, so a killed run still
# returns everything measured before the kill.
#
#   FASTTIPS_GIT_COMMIT=<sha> bash bench/gpu_session.sh            # on the lent GPU
#   bash bench/gpu_session.sh --dry-run                            # the same stages on the CPU, tiny shapes
#
# Stages, in order of decision value (estimates on one H100/H200 with Triton 3.6, seconds; a fresh
# machine compiles every kernel, so the first stages carry the compile time):
#   env           environment, nvidia-smi, the matmul and copy ceilings                         20
#   dispatch      measured dispatch on the bench shapes: every candidate of every op (the six
#                 fasttips attention variants, the SDPA backends, the CE paths, the EMA) checked
#                 against the reference, timed, and the decisions (45 s per op and shape)        200
#   step_dispatch vit-l step at batch 64, compiled: auto (measured dispatch) vs plain vs
#                 fasttips-only (issue 26's criterion: auto >= the best of the other two)        150
#   kernel_tests  pytest -m gpu on the kernels: every attention variant, the CE, the EMA and the
#                 dispatch candidates in bf16 (the 2x-error rule); -x, so a failure shows early    90
#   attention     per variant and config, N = 256/257/272, 1025 and 50, with the SDPA peers,
#                 CUDA-graph replay beside per-call timing                                      240
#   dino_loss     prototype cross-entropy paths at T = 16384, K = 65536                          60
#   step          vit-l step: fasttips vs plain (full-EMA and head-only teachers), eager + compiled 170
#   profile       the vit-l step by category, fasttips and plain, eager                           50
#   max_batch     the largest batch of fasttips and the plain baseline (eager), timed there      180
#   ema           head EMA, per-call and CUDA-graph replay                                       25
#   recompute     vit-l step per activation-checkpointing policy: memory per image, step time     60
#   gpu_tests     the rest of pytest -m gpu (checkpoint, eval, step sync, compile)      what is left
# In a default 480 s window the first four stages fit (460 s); the others run when time is left.
#
# BUDGET_S and the estimates apply to the dry run too (it takes ~2 min on 2 busy CPU cores);
# ONLY="env profile ..." runs a subset of the stages (the others are recorded as skipped).
#
# Output ($OUT, default ./gpu-session-out): rows.jsonl (every row of every bench, appended the moment
# it is measured: FASTTIPS_BENCH_STREAM), results/<bench>-<device>.jsonl (the benches' own files:
# FASTTIPS_BENCH_RESULTS points there, so the checkout's bench/results/ is never touched),
# results/plots/profile_step-*.png, logs/<stage>.log (written as it goes), session.jsonl (one line
# per stage: status ok/failed/timeout/skipped, seconds). bench/README.md says how to fold them back.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash bench/gpu_session.sh [--dry-run]   (the stages are fixed; see the header)" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-480}
OUT=${OUT:-$PWD/gpu-session-out}
mkdir -p "$OUT/logs" "$OUT/results" || exit 2
export PYTHONUNBUFFERED=1 FASTTIPS_BENCH_STREAM="$OUT/rows.jsonl" FASTTIPS_BENCH_RESULTS="$OUT/results"
START=$(date +%s)

if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  Q=--quick
else
  export TRITON_INTERPRET=0
  Q=--quick          # the issue's shapes with short timing windows on a GPU
  if [ -z "${FASTTIPS_GIT_COMMIT:-}" ]; then
    echo "set FASTTIPS_GIT_COMMIT=<sha> (the device copy has no .git; rows name their commit)" >&2; exit 2
  fi
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device")' || exit 2
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/logs/install.log" 2>&1 || {
    echo "pip install -e . failed: $OUT/logs/install.log" >&2; exit 2; }
fi

elapsed() { echo $(( $(date +%s) - START )); }

# stage NAME ESTIMATE_S COMMAND...: run it if the estimate fits in the time left, under a timeout of
# the time left, with its output to the terminal and to $OUT/logs/NAME.log as it goes.
stage() {
  local name=$1 estimate=$2; shift 2
  local left=$(( BUDGET_S - $(elapsed) )) t0 status rc
  if [ -n "${ONLY:-}" ] && [[ " ${ONLY//,/ } " != *" $name "* ]]; then
    printf '{"stage": "%s", "status": "skipped", "seconds": 0, "reason": "not in ONLY"}\n' "$name" >> "$OUT/session.jsonl"
    return 0
  fi
  if [ "$left" -lt "$estimate" ]; then
    echo "== $name: skipped ($left s left, needs ~$estimate s)"
    printf '{"stage": "%s", "status": "skipped", "seconds": 0, "left_s": %d, "estimate_s": %d}\n' \
      "$name" "$left" "$estimate" >> "$OUT/session.jsonl"
    return 0
  fi
  echo "== $name (estimate ${estimate} s, ${left} s left)"
  t0=$(date +%s)
  timeout --kill-after=10 "$left" "$@" 2>&1 | tee "$OUT/logs/$name.log"
  rc=${PIPESTATUS[0]}
  case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
  printf '{"stage": "%s", "status": "%s", "rc": %d, "seconds": %d, "elapsed_s": %d}\n' \
    "$name" "$status" "$rc" "$(( $(date +%s) - t0 ))" "$(elapsed)" >> "$OUT/session.jsonl"
  [ "$status" = ok ] || FAILED="${FAILED:-} $name"
}

# Optional flags, used when the bench supports them (bench_attention.py belongs to the kernels work):
# extra sequence lengths and CUDA-graph replay timing beside per-call timing.
supports() { grep -q -- "\"$2\"" "$1"; }       # the flag's string in the script's argparse
ATTN_FLAGS=(--no-flex)
supports bench/bench_attention.py --seqlens && ATTN_FLAGS+=(--seqlens 256,257,272,1025,50)
supports bench/bench_attention.py --graph && ATTN_FLAGS+=(--graph)

if [ "$DRY" = 1 ]; then
  DISPATCH=(--budget-s 5)
  STEP_DISPATCH=(--quick --kernels auto,plain,fasttips-only --compile on --no-max-batch)
  STEP=(--quick --compile off,on --no-max-batch)
  PROFILE=(--quick --kernels auto,plain)
  MAXB=(--quick --kernels auto --max-batch-refine 1)   # the search itself is CUDA-only: a smoke run
  LOSS=(--quick --no-compile)
  RECOMPUTE=(--quick)
  KERNEL_TESTS=(tests/kernels/test_ema.py)
  GPU_TESTS=(tests/test_step_sync.py)
else
  DISPATCH=(--quick --budget-s 45)
  STEP_DISPATCH=(--preset vit-l --batch 64 --kernels auto,plain,fasttips-only --compile on --no-max-batch)
  STEP=(--preset vit-l --batch 64,32 --kernels auto,plain,plain-head --compile off,on --no-max-batch)
  PROFILE=(--preset vit-l --batch 64 --kernels auto,plain)
  MAXB=(--preset vit-l --batch 64,32 --kernels plain,auto --max-batch-refine 1)
  LOSS=(--quick --tokens 16384 --prototypes 65536)
  RECOMPUTE=(--preset vit-l --batch 32)
  KERNEL_TESTS=(tests/kernels)
  GPU_TESTS=(tests --ignore=tests/kernels)
fi

stage env 20 "$PY" - <<'EOF'
import json, os, subprocess, sys
sys.path.insert(0, "bench")
import torch, harness
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
row = {"bench": "env", **harness.environment(device), "ceilings": harness.measure_ceilings(device)}
if device.type == "cuda":
    p = torch.cuda.get_device_properties(device)
    row.update(sm=f"{p.major}.{p.minor}", memory_gib=p.total_memory / 2**30, multiprocessors=p.multi_processor_count)
    try:
        row["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as exc:
        row["nvidia_smi"] = f"unavailable: {exc}"
harness.stream_row(row)
print(json.dumps(row, indent=1))
EOF
stage dispatch 200 "$PY" bench/bench_dispatch.py "${DISPATCH[@]}"
stage step_dispatch 150 "$PY" bench/bench_train_step.py "${STEP_DISPATCH[@]}"
stage kernel_tests 90 "$PY" -m pytest -q -x -m gpu -p no:cacheprovider "${KERNEL_TESTS[@]}"
stage attention 240 "$PY" bench/bench_attention.py $Q "${ATTN_FLAGS[@]}"
stage dino_loss 60 "$PY" bench/bench_dino_loss.py "${LOSS[@]}"
stage step 170 "$PY" bench/bench_train_step.py "${STEP[@]}"
stage profile 50 "$PY" bench/profile_step.py "${PROFILE[@]}" --out "$OUT/results"
stage max_batch 180 "$PY" bench/bench_train_step.py "${MAXB[@]}"
stage ema 25 "$PY" bench/bench_ema.py --quick
stage recompute 60 "$PY" bench/bench_recompute.py "${RECOMPUTE[@]}"
stage gpu_tests 30 "$PY" -m pytest -q -m gpu -p no:cacheprovider "${GPU_TESTS[@]}"

echo "== done in $(elapsed) s (budget ${BUDGET_S} s); rows: $OUT/rows.jsonl ($(wc -l < "$OUT/rows.jsonl" 2>/dev/null || echo 0) lines)"
if [ -n "${FAILED:-}" ]; then
  echo "stages not ok:${FAILED} (see $OUT/logs/ and $OUT/session.jsonl)" >&2
  exit 1
fi
exit 0
