#!/usr/bin/env bash
# One prepared GPU benchmark run (one NVIDIA GPU), inside a total time budget: encode throughput and
# training step time of minilm_jax and sentence-transformers through bench/encode.py and
# bench/train.py, float32 and bfloat16, then one summary table.
#
#   MODEL_DIR=/path/to/all-MiniLM-L6-v2 BENCH_DATA_DIR=/path/to/data bash bench/gpu.sh [MODE]
#
# MODE (each fits the default budget of 470 s, i.e. under 8 minutes with start-up and summary):
#   all       (default) encode fp32 + encode bf16 + train fp32 + train bf16, both libraries
#   encode    encode only, fp32 and bf16, batch 128 and 512
#   train     train only, fp32 and bf16, batch 16 and 256
#   dispatch  ours only, batch 16, fp32: 1, 16 and 32 optimizer steps per device call
#             (--steps-per-dispatch: the per-step overhead killer), ms/step for each
#
# Needs: MODEL_DIR (a sentence-transformers model folder); the data folder with quora_train.tsv
# ($BENCH_DATA_DIR, else ./shared/data, else ../shared/data); python3 ($PY) with jax (CUDA), flax,
# optax, torch (CUDA), sentence-transformers, tokenizers, safetensors. `datasets` is not needed.
# Output goes to stdout and to $OUT/gpu_bench.log (with each step's JSON and stderr) when OUT is set.
#
# Time: GPU_BENCH_BUDGET (default 470) seconds for all steps together; each step runs under
# `timeout` with its own limit, cut to what is left of the budget, and a step that would get less
# than 40 s is skipped. A step stopped by its limit still reports the batch sizes it finished
# (the scripts write their JSON after each batch size).
#
# Compile time is what makes GPU runs slow (an earlier try lost two 75 s steps to it), so:
#  - ours runs its two fixed-shape programs (train_step.py) with --compilation-cache (a persistent cache, $GPU_BENCH_CACHE,
#    default /tmp/gpu-bench-xla-cache, shared by the steps and by later runs on the same machine:
#    `dispatch` after `all` reuses the K=1 float32 program);
#  - encode uses 10,000 sentences (fewer long-tail bucket shapes than 20,000);
#  - XLA's GEMM autotuning is off (XLA_FLAGS=--xla_gpu_autotune_level=0), which cuts compile time
#    a lot and can only make our steady figures slower, not faster. GPU_BENCH_AUTOTUNE=1 keeps it
#    on. A preflight checks that this XLA accepts the flag and drops it otherwise.
# float32 means full float32 on both sides: our model asks for Precision.HIGHEST on its float32
# matmuls (and --precision highest sets the global default too); torch keeps TF32 off by default.
# GPU_BENCH_SMOKE=1 DEVICE=cpu PY=.venv/bin/python runs tiny sizes on a machine without a GPU.
set -u
cd "$(dirname "$0")/.."
MODE=${1:-all}
case "$MODE" in all|encode|train|dispatch) ;; *) echo "usage: bash bench/gpu.sh [all|encode|train|dispatch]"; exit 2;; esac
PY=${PY:-python3}
LOGDIR=${OUT:-$(mktemp -d /tmp/gpu-bench-XXXXXX)}
mkdir -p "$LOGDIR"
LOG="$LOGDIR/gpu_bench.log"
: >"$LOG"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TF_CPP_MIN_LOG_LEVEL=2
START=$SECONDS
BUDGET=${GPU_BENCH_BUDGET:-470}
CACHE=${GPU_BENCH_CACHE:-/tmp/gpu-bench-xla-cache}

say() { echo "$@" | tee -a "$LOG"; }

if [ -z "${MODEL_DIR:-}" ] || [ ! -f "$MODEL_DIR/config.json" ]; then
  say "error: set MODEL_DIR to the all-MiniLM-L6-v2 model folder (got '${MODEL_DIR:-}')"; exit 2
fi
DATA=${BENCH_DATA_DIR:-}
[ -z "$DATA" ] && { [ -d shared/data ] && DATA=shared/data || DATA=../shared/data; }
if [ ! -f "$DATA/quora_train.tsv" ]; then
  say "error: no quora_train.tsv in '$DATA'; set BENCH_DATA_DIR"; exit 2
fi
export BENCH_DATA_DIR=$DATA

say "# bench/gpu.sh $MODE $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET}s"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1 | tee -a "$LOG"
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cuda ] && [ "${GPU_BENCH_AUTOTUNE:-0}" != 1 ]; then
  FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0"
  if XLA_FLAGS="$FLAGS" timeout 60 $PY -c "import jax, jax.numpy as jnp; (jnp.ones((64, 64)) @ jnp.ones((64, 64))).block_until_ready()" \
      >/dev/null 2>&1; then
    export XLA_FLAGS="$FLAGS"
  else
    say "note: this XLA rejects --xla_gpu_autotune_level=0 (or the preflight failed); autotuning stays on"
  fi
fi
$PY - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib.metadata as m, os, platform
names = ["jax", "jaxlib", "flax", "optax", "torch", "sentence-transformers", "transformers", "tokenizers"]
def v(n):
    try:
        return m.version(n)
    except m.PackageNotFoundError:
        return "-"
print("python", platform.python_version(), ", ".join(f"{n} {v(n)}" for n in names))
print("XLA_FLAGS:", os.environ.get("XLA_FLAGS", "(none)"))
EOF
say "(start-up took $((SECONDS - START)) s)"

step() {  # step NAME SECONDS ARGS...: one sub-run under a hard time limit, cut to the budget left
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - (SECONDS - START)))
  [ "$left" -lt "$limit" ] && limit=$left
  say ""
  if [ "$limit" -lt 40 ]; then
    say "## $name skipped: only ${left}s of the ${BUDGET}s budget left"; return
  fi
  say "## $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout -k 5 "$limit" $PY "$@" --json "$LOGDIR/$name.json" 2>"$LOGDIR/$name.stderr" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" != 0 ]; then
    say "!! $name failed (exit $rc$([ "$rc" = 124 ] && echo ': timed out')); last stderr lines:"
    grep -v -e "Loading weights" -e "^\s*$" "$LOGDIR/$name.stderr" | tail -n 15 | tee -a "$LOG"
  fi
  say "($name took $((SECONDS - t0)) s; $((SECONDS - START)) s of the budget used)"
}

if [ "${GPU_BENCH_SMOKE:-0}" = 1 ]; then
  N=200 EB="32 64" TB="4 8" STEPS=2 KSTEPS=4 K1=2 K2=4 PASSES=1
else
  N=10000 EB="128 512" TB="16 256" STEPS=20 KSTEPS=64 K1=16 K2=32 PASSES=3
fi
COMMON="--device $DEVICE --model $MODEL_DIR --compilation-cache $CACHE"
ENC="bench/encode.py --n $N --batch-sizes $EB --passes $PASSES $COMMON"
TRN="bench/train.py --batch-sizes $TB --steps $STEPS --passes $PASSES $COMMON"
B16=${TB%% *}
case "$MODE" in
  all)
    step encode_fp32 110 $ENC --dtype float32 --precision highest --st-dtype float32
    step encode_bf16 100 $ENC --dtype bfloat16 --st-dtype bfloat16
    step train_fp32 140 $TRN --dtype float32 --precision highest --st-amp none
    step train_bf16 120 $TRN --dtype bfloat16 --st-amp bfloat16 ;;
  encode)
    step encode_fp32 230 $ENC --dtype float32 --precision highest --st-dtype float32
    step encode_bf16 230 $ENC --dtype bfloat16 --st-dtype bfloat16 ;;
  train)
    step train_fp32 230 $TRN --dtype float32 --precision highest --st-amp none
    step train_bf16 230 $TRN --dtype bfloat16 --st-amp bfloat16 ;;
  dispatch)
    for k in 1 $K1 $K2; do
      step train_k$k 150 bench/train.py --which ours --batch-sizes $B16 --steps $KSTEPS --passes $PASSES \
        --steps-per-dispatch $k --dtype float32 --precision highest $COMMON
    done ;;
esac

say ""
say "## summary (medians; ratio = ours / sentence-transformers throughput)"
$PY - "$LOGDIR" <<'EOF' 2>&1 | tee -a "$LOG"
import json, statistics, sys
from pathlib import Path

d = Path(sys.argv[1])

def load(name):
    p = d / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None

def arg(r, flag, default=None):
    return r["argv"][r["argv"].index(flag) + 1] if flag in r["argv"] else default

rows = []
for name, label in (("encode_fp32", "encode fp32 (highest)"), ("encode_bf16", "encode bf16")):
    r = load(name)
    if not r:
        continue
    n = int(arg(r, "--n"))
    label += " (partial: timed out)" if r.get("partial") else ""
    for bs in r["results"]["ours"]:
        o = n / statistics.median(r["results"]["ours"][bs]["seconds"])
        st = r["results"].get("st", {}).get(bs)
        s = n / statistics.median(st["seconds"]) if st else float("nan")
        rows.append((label, bs, "sentences/s", f"{o:,.0f}", f"{s:,.0f}" if st else "-", f"{o / s:.2f}x" if st else "-"))
names = [("train_fp32", "train fp32 (highest)"), ("train_bf16", "train bf16")]
names += sorted(((p.stem, "train fp32, ours, K=" + p.stem[len("train_k"):]) for p in d.glob("train_k*.json")),
                key=lambda x: int(x[0][len("train_k"):]))
for name, label in names:
    r = load(name)
    if not r:
        continue
    steps = int(arg(r, "--steps"))
    label += " (partial: timed out)" if r.get("partial") else ""
    for bs in r["results"]["ours"]:
        o = 1000 * statistics.median(x["seconds"] for x in r["results"]["ours"][bs]["runs"]) / steps
        st = r["results"].get("st", {}).get(bs)
        s = 1000 * statistics.median(x["seconds"] for x in st["runs"]) / steps if st else float("nan")
        rows.append((label, bs, "ms/step", f"{o:.2f}", f"{s:.2f}" if st else "-", f"{s / o:.2f}x" if st else "-"))
head = ("run", "batch", "unit", "minilm_jax", "sentence-transformers", "ratio")
w = [max(len(str(x[i])) for x in rows + [head]) for i in range(len(head))]
print("| " + " | ".join(h.ljust(n) for h, n in zip(head, w)) + " |")
print("|" + "|".join("-" * (n + 2) for n in w) + "|")
for row in rows:
    print("| " + " | ".join(str(c).ljust(n) for c, n in zip(row, w)) + " |")
if not rows:
    print("(no step finished)")
EOF
say "log: $LOG ($((SECONDS - START)) s in all)"
