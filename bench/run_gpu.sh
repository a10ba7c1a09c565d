#!/usr/bin/env bash
# The one prepared GPU run: the project's train-step bench and the Hugging Face
# peer at the same shapes, one after the other on the same card, JSON to $OUT.
#
#   bash bench/run_gpu.sh                            # on the GPU machine, repo root
#   BENCH_SMOKE=1 OUT=/tmp/smoke bash bench/run_gpu.sh   # CPU dry run, tiny shapes
#   BENCH_DRY_RUN=1 bash bench/run_gpu.sh            # print each job's command, run nothing
#
# Needs only jax/flax/optax (project bench) and torch/transformers/peft (peer):
# no gin, seqio or TensorFlow. Order = priority; each job has a hard cap and the
# whole script a budget (BENCH_BUDGET_S, default 470 s, under 8 minutes): jobs
# that would start with under 20 s left are skipped and say so. Every job
# writes $OUT/<job>.json and $OUT/<job>.log; $OUT/summary.txt/.json merge them.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/bench_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export USE_TF=0 HF_HUB_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=3
BUDGET=${BENCH_BUDGET_S:-470}
START=$(date +%s)

if [ "${BENCH_SMOKE:-0}" = 1 ]; then
  # CPU dry run: every job, tiny shapes, few steps.
  BASE=(--sizes=tiny --batch=2 --inputs_len=32 --targets_len=8)
  LARGE=(--sizes=tiny --batch=2 --inputs_len=32 --targets_len=8)
  STEPS=(--warmup=1 --steps=3)
  CAP_JAX=240; CAP_HF=120
else
  BASE=(--sizes=base --batch=64 --inputs_len=512 --targets_len=64)
  LARGE=(--sizes=large --batch=32 --inputs_len=512 --targets_len=64)
  STEPS=(--warmup=3 --steps=10)
  CAP_JAX=150; CAP_HF=100
fi

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

job() {  # job NAME CAP_S SCRIPT ARGS...: one bench process, capped, JSON + log in $OUT
  local name=$1 cap=$2 script=$3; shift 3
  local remaining; remaining=$(left)
  if [ "$remaining" -lt 20 ]; then
    echo "SKIP $name: ${BUDGET}s budget spent" | tee -a "$OUT/skipped.txt"
    return
  fi
  [ "$cap" -gt "$remaining" ] && cap=$remaining
  if [ "${BENCH_DRY_RUN:-0}" = 1 ]; then
    echo "JOB $name bench/$script $* ${STEPS[*]} --out=$OUT/$name.json"
    return
  fi
  echo "== $name (cap ${cap}s, $(left)s of budget left)"
  # The bench's own budget stops it starting a configuration it cannot finish.
  timeout -k 10 "$cap" "$PY" "bench/$script" "$@" "${STEPS[@]}" \
      --time_budget_s=$(( cap * 2 / 3 )) --out="$OUT/$name.json" --overwrite \
      > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc ($(( $(date +%s) - START ))s elapsed)"
  tail -n 4 "$OUT/$name.log" | cut -c1-200
}

[ "${BENCH_DRY_RUN:-0}" = 1 ] || {
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
      --format=csv 2>&1 || echo "no nvidia-smi"
  "$PY" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" 2>&1
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" 2>&1
  "$PY" -c "import peft; print('peft', peft.__version__)" 2>&1 | tail -1
} > "$OUT/env.txt"
[ "${BENCH_DRY_RUN:-0}" = 1 ] || cat "$OUT/env.txt"

# 1. Headline: base, batch 64, 512/64, full fine-tuning, none vs HyperPrompt-Global.
job jax_base "$CAP_JAX" train_step.py "${BASE[@]}" --methods=none,global --freeze=all --rounds=2
# 2. The peer at the same shapes on the same card.
job hf_base "$CAP_HF" hf_peer.py "${BASE[@]}" --modes=full,peft_prefix
# 3. Large, batch 32, HyperPrompt-Global; then its peer.
job jax_large "$CAP_JAX" train_step.py "${LARGE[@]}" --methods=global --freeze=all
job hf_large "$CAP_HF" hf_peer.py "${LARGE[@]}" --modes=full,peft_prefix
# 4. Variants of base Global. The fused paths have no attention-weight dropout, so
#    layers.py uses the einsum path while it is on: compare them with attention-weight
#    dropout off and dropout 0.1 everywhere else (T5Config.attention_dropout_rate=0).
job jax_base_attention "$CAP_JAX" train_step.py "${BASE[@]}" --methods=global --freeze=all \
    --attention_dropout_rate=0.0 --attention_impls=xla,cudnn,dot_product_attention
job jax_base_remat "$CAP_JAX" train_step.py "${BASE[@]}" --methods=global --freeze=all \
    --remat_policies=dots,full
# 5. Dropout keys from the rbg generator instead of threefry.
job jax_base_rbg "$CAP_JAX" train_step.py "${BASE[@]}" --methods=global --freeze=all \
    --prng_impl=unsafe_rbg

[ "${BENCH_DRY_RUN:-0}" = 1 ] && exit 0
"$PY" - "$OUT" <<'EOF' 2>&1 | tee "$OUT/summary.txt"
import sys
from bench import train_step
print(train_step.summarize(sys.argv[1]))
EOF
echo "total $(( $(date +%s) - START ))s; files in $OUT"
