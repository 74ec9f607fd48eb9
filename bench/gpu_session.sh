#!/usr/bin/env bash
# Everything measured on one lent H200 in a single call of at most ~9.5 minutes, in priority order,
# each part under a hard time limit:
#   1. the reference recipe (2 epochs of quora_train.tsv, batch 16) trained by both libraries and
#      scored on quora_dev.tsv (bench/quora_recipe.py)                                   <= 270 s
#   2. the training time of 45,484 steps at batch 16 (the size of the reference's 2 epochs over
#      363,858 pairs) with train.py, quora_train.tsv cycled                               <= 110 s
#   3. bench/gpu.sh (encode and train step times of both libraries, float32 and bf16)   the rest
#
#   MODEL_DIR=/path/to/all-MiniLM-L6-v2 BENCH_DATA_DIR=/path/to/data OUT=/tmp/out bash bench/gpu_session.sh
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-$(mktemp -d /tmp/gpu-session-XXXXXX)}
DATA=${BENCH_DATA_DIR:?set BENCH_DATA_DIR to the folder with quora_train.tsv and quora_dev.tsv}
: "${MODEL_DIR:?set MODEL_DIR to the all-MiniLM-L6-v2 folder}"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TF_CPP_MIN_LOG_LEVEL=2
export MINILM_JAX_CACHE_DIR=/tmp/minilm-jax-xla  # shared by the runs below: one compile per program
START=$SECONDS
LOG=$OUT/session.log
say() { echo "$@" | tee -a "$LOG"; }

say "# bench/gpu_session.sh $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"

say "## 1. reference recipe, both libraries"
timeout -k 5 270 $PY bench/quora_recipe.py --device cuda --model "$MODEL_DIR" \
  --train-file "$DATA/quora_train.tsv" --eval-file "$DATA/quora_dev.tsv" --output-dir /tmp/quora_recipe \
  --ours-args "--steps-per-dispatch 16 --checkpoint-every 1024 --no-progress" \
  --json "$OUT/quora_recipe.json" 2>"$OUT/quora_recipe.stderr" | tee -a "$LOG"
say "(part 1 exit ${PIPESTATUS[0]}, $((SECONDS - START)) s so far)"
tail -n 5 "$OUT/quora_recipe.stderr" >>"$LOG"
cp /tmp/quora_recipe/ours/metrics.jsonl "$OUT/quora_ours_metrics.jsonl" 2>/dev/null

say "## 2. 45,484 steps at batch 16 (train.py, float32, 16 steps per dispatch, no evaluation)"
timeout -k 5 110 $PY train.py --model "$MODEL_DIR" --train-file "$DATA/quora_train.tsv" --epochs 23 \
  --max-steps 45484 --steps-per-dispatch 16 --checkpoint-every 45488 --log-every 4096 --no-progress \
  --output-dir /tmp/recipe45k >"$OUT/recipe45k.out" 2>"$OUT/recipe45k.stderr"
say "(part 2 exit $?, $((SECONDS - START)) s so far)"
cat "$OUT/recipe45k.out" >>"$LOG"; tail -n 3 "$OUT/recipe45k.stderr" >>"$LOG"
$PY - /tmp/recipe45k/metrics.jsonl <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
steps = [r for r in rows if "pairs_per_second" in r and r["pairs_per_second"]]
secs = sum(4096 * 16 / r["pairs_per_second"] for r in steps)  # each record covers --log-every steps
last = rows[-1]["step"] if rows else 0
print(f"45k run: {last} steps done; pairs/s per interval: {[round(r['pairs_per_second']) for r in steps]}")
if steps:
    mean_pps = sum(r["pairs_per_second"] for r in steps) / len(steps)
    print(f"training time for 45,484 steps at the mean rate: {45484 * 16 / mean_pps:.1f} s "
          f"({1000 * 16 / mean_pps:.3f} ms/step, compilation and start-up excluded)")
PYEOF

LEFT=$((560 - (SECONDS - START)))
say "## 3. bench/gpu.sh with $LEFT s left"
if [ "$LEFT" -gt 60 ]; then
  timeout -k 5 "$LEFT" env OUT="$OUT" bash bench/gpu.sh 2>&1 | tail -n 40 >>"$LOG"
fi
say "done in $((SECONDS - START)) s"
