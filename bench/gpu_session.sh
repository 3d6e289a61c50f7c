#!/usr/bin/env bash
# What a session with a lent GPU runs to check and measure everything that needs one, in three stages
# meant to fit one 10-minute device call each (the device tool's limit; 30 minutes per session in all).
# Written without a GPU: the stage times are estimates from earlier H100 runs of the same benches.
#
#   FASTTIPS_GIT_COMMIT=<sha> bash bench/gpu_session.sh check    # GPU tests: pytest -m gpu (bf16, 2x rule)
#   FASTTIPS_GIT_COMMIT=<sha> bash bench/gpu_session.sh kernels  # attention + dino-loss + ema benches
#   FASTTIPS_GIT_COMMIT=<sha> bash bench/gpu_session.sh step     # end-to-end step vs plain PyTorch (issue 8)
#
# The device machine gets a copy of the tree without .git, hence FASTTIPS_GIT_COMMIT (the harness
# writes it into every row). New result rows and logs are copied to $OUT when it is set (the device
# tool brings back what is there); commit them under bench/results/ afterwards, then `fasttips bench --plot`.
set -uo pipefail
stage=${1:?usage: bash bench/gpu_session.sh check|kernels|step}
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
: "${FASTTIPS_GIT_COMMIT:?set FASTTIPS_GIT_COMMIT=<sha> (the device copy has no .git)}"
python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device")' || exit 2
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 2
log=/tmp/fasttips-gpu-$stage.log
before=$(mktemp)
wc -l bench/results/*.jsonl 2>/dev/null > "$before"

case $stage in
  check)
    python3 -m pytest -q -m gpu tests 2>&1 | tee "$log" ;;
  kernels)
    { python3 bench/bench_attention.py --quick --no-flex
      python3 bench/bench_dino_loss.py --quick --tokens 16384 --prototypes 65536
      python3 bench/bench_ema.py --quick; } 2>&1 | tee "$log" ;;
  step)
    { python3 bench/bench_train_step.py --preset vit-b --batch 128,64 --no-max-batch
      python3 bench/bench_train_step.py --preset vit-l --batch 64,32; } 2>&1 | tee "$log" ;;
  *) echo "unknown stage '$stage': choose check, kernels or step" >&2; exit 2 ;;
esac
status=$?

if [ -n "${OUT:-}" ]; then
  cp "$log" "$OUT/" 2>/dev/null
  # only the rows this stage appended, one file per results file
  for f in bench/results/*.jsonl; do
    old=$(awk -v f="$f" '$2 == f {print $1}' "$before"); old=${old:-0}
    new=$(wc -l < "$f")
    [ "$new" -gt "$old" ] && tail -n $((new - old)) "$f" > "$OUT/new-$(basename "$f")"
  done
fi
exit $status
