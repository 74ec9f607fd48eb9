#!/usr/bin/env bash
# Everything to measure on one lent GPU in a single call of at most ~9.5 minutes, in priority order,
# each part under a hard time limit:
#   1. time to a trained model on 8,000 Quora pairs (500 steps at batch 16, 16 steps per dispatch),
#      float32 then bfloat16: compile seconds and programs with an empty cache, the same with the
#      cache filled (another seed and learning rate: nothing to compile), and the steady pairs/s
#      (bench/time_to_model.py, ours only)                                                 <= 2 x 150 s
#   2. why compiling takes long: the float32 cold run again with XLA's GEMM autotuning off
#      (--xla_gpu_autotune_level=0), and the HLO size of the two programs                   <= 100 s
#   3. the reference recipe (2 epochs of quora_train.tsv) by both libraries, scored on quora_dev.tsv
#      (bench/quora_recipe.py)                                                            the rest
#
#   MODEL_DIR=/path/to/all-MiniLM-L6-v2 BENCH_DATA_DIR=/path/to/data OUT=/tmp/out bash bench/gpu_session.sh
#   GPU_SESSION_SMOKE=1 DEVICE=cpu ... bash bench/gpu_session.sh    # a short check of the script on CPU
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-$(mktemp -d /tmp/gpu-session-XXXXXX)}
DEVICE=${DEVICE:-cuda}
: "${BENCH_DATA_DIR:?set BENCH_DATA_DIR to the folder with quora_train.tsv and quora_dev.tsv}"
: "${MODEL_DIR:?set MODEL_DIR to the all-MiniLM-L6-v2 folder}"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TF_CPP_MIN_LOG_LEVEL=2
PAIRS=8000; K=16; LIMIT1=150; LIMIT2=100; TOTAL=560
if [ -n "${GPU_SESSION_SMOKE:-}" ]; then PAIRS=64; K=2; LIMIT1=400; LIMIT2=300; TOTAL=1500; fi
START=$SECONDS
LOG=$OUT/session.log
say() { echo "$@" | tee -a "$LOG"; }

say "# bench/gpu_session.sh $(date -u +%FT%TZ) on $DEVICE"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"

for DTYPE in float32 bfloat16; do
  say "## 1. time to a trained model, $DTYPE, $PAIRS pairs, $K steps per dispatch"
  timeout -k 5 $LIMIT1 $PY bench/time_to_model.py --which ours --device "$DEVICE" --pairs $PAIRS \
    --ours-args "--steps-per-dispatch $K --checkpoint-every $((K * 64)) --dtype $DTYPE" \
    --output-dir "/tmp/ttm-$DTYPE" --json "$OUT/time_to_model-$DTYPE.json" 2>>"$OUT/time_to_model.stderr" | tee -a "$LOG"
  say "(part 1 $DTYPE exit ${PIPESTATUS[0]}, $((SECONDS - START)) s so far)"
done

say "## 2. float32 cold again, GEMM autotuning off; HLO sizes"
timeout -k 5 $LIMIT2 env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" $PY bench/time_to_model.py \
  --which ours --device "$DEVICE" --pairs $PAIRS --ours-args "--steps-per-dispatch $K --checkpoint-every $((K * 64))" \
  --output-dir /tmp/ttm-noautotune --json "$OUT/time_to_model-noautotune.json" 2>>"$OUT/time_to_model.stderr" | tee -a "$LOG"
say "(part 2 exit ${PIPESTATUS[0]}, $((SECONDS - START)) s so far)"
timeout -k 5 60 $PY bench/program_stats.py --steps-per-dispatch $K 2>&1 | tee -a "$LOG"

LEFT=$((TOTAL - (SECONDS - START)))
say "## 3. the reference recipe, both libraries, with $LEFT s left"
if [ "$LEFT" -gt 120 ] && [ -z "${GPU_SESSION_SMOKE:-}" ]; then
  timeout -k 5 "$LEFT" $PY bench/quora_recipe.py --device "$DEVICE" --model "$MODEL_DIR" \
    --train-file "$BENCH_DATA_DIR/quora_train.tsv" --eval-file "$BENCH_DATA_DIR/quora_dev.tsv" \
    --output-dir /tmp/quora_recipe --ours-args "--steps-per-dispatch $K --checkpoint-every 1024" \
    --json "$OUT/quora_recipe.json" 2>"$OUT/quora_recipe.stderr" | tee -a "$LOG"
  say "(part 3 exit ${PIPESTATUS[0]})"
fi
say "done in $((SECONDS - START)) s"
