#!/usr/bin/env bash
# One prepared GPU benchmark run (one NVIDIA GPU, at most ~8 minutes even if every step hits its
# timeout): encode throughput and training step time of minilm_jax and sentence-transformers,
# float32 and bfloat16, through bench/encode.py and bench/train.py, then one summary table.
#
#   MODEL_DIR=/path/to/all-MiniLM-L6-v2 BENCH_DATA_DIR=/path/to/data bash bench/gpu.sh
#
# Needs: MODEL_DIR (a sentence-transformers model folder); the data folder with quora_train.tsv
# ($BENCH_DATA_DIR, else ./shared/data, else ../shared/data); python3 with jax (CUDA), flax, optax,
# torch (CUDA), sentence-transformers, tokenizers, safetensors. `datasets` is not needed here.
# All output also goes to $OUT/gpu_bench.log (and the per-step JSON files to $OUT) when OUT is set.
#
# Steps and their time limits (seconds):
#   encode float32, matmul precision 'highest' (no TF32), batch 128 and 512, 20,000 sentences   75
#   encode bfloat16 (ours --dtype bfloat16, torch autocast bf16), same                         75
#   train float32 ('highest'), batch 16 and 256, 30 timed steps x 3 passes                       115
#   train bfloat16 (ours --dtype bfloat16, torch autocast bf16), same                            115
#   train ours only, batch 16, --steps-per-dispatch 16 (64 steps): the per-step overhead killer  70
# Ours runs with --one-shape (every dispatch padded to the largest packed shape of the timed steps)
# so that each batch size compiles one program. float32 means full float32 on both sides: our model
# asks for Precision.HIGHEST on its float32 matmuls (and --precision highest sets the global default
# too); torch keeps allow_tf32 off by default. GPU_BENCH_EXTRA=1 adds ours with 32 steps per
# dispatch (not inside the 8 minutes).
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
LOGDIR=${OUT:-$(mktemp -d /tmp/gpu-bench-XXXXXX)}
mkdir -p "$LOGDIR"
LOG="$LOGDIR/gpu_bench.log"
: >"$LOG"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TF_CPP_MIN_LOG_LEVEL=2

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

say "# bench/gpu.sh $(date -u +%Y-%m-%dT%H:%M:%SZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1 | tee -a "$LOG"
$PY - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib.metadata as m, platform
names = ["jax", "jaxlib", "flax", "optax", "torch", "sentence-transformers", "transformers", "tokenizers"]
def v(n):
    try:
        return m.version(n)
    except m.PackageNotFoundError:
        return "-"
print("python", platform.python_version(), ", ".join(f"{n} {v(n)}" for n in names))
EOF

step() {  # step NAME SECONDS ARGS...: one sub-run under a hard time limit
  local name=$1 limit=$2; shift 2
  say ""
  say "## $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout -k 5 "$limit" $PY "$@" --json "$LOGDIR/$name.json" 2>"$LOGDIR/$name.stderr" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" != 0 ]; then
    say "!! $name failed (exit $rc$([ "$rc" = 124 ] && echo ': timed out')); last stderr lines:"
    grep -v -e "Loading weights" -e "^\s*$" "$LOGDIR/$name.stderr" | tail -n 15 | tee -a "$LOG"
  fi
  say "($name took $((SECONDS - t0)) s)"
}

# GPU_BENCH_SMOKE=1 DEVICE=cpu: tiny sizes, to check this script on a machine without a GPU.
DEVICE=${DEVICE:-cuda}
if [ "${GPU_BENCH_SMOKE:-0}" = 1 ]; then
  N=200 EB="32 64" TB="4 8" STEPS=2 KSTEPS=4 K=2 PASSES=1 T=${GPU_BENCH_SMOKE_LIMIT:-400}
else
  N=20000 EB="128 512" TB="16 256" STEPS=30 KSTEPS=64 K=16 PASSES=3 T=
fi
ENC="bench/encode.py --n $N --batch-sizes $EB --passes $PASSES --device $DEVICE --model $MODEL_DIR"
TRN="bench/train.py --batch-sizes $TB --steps $STEPS --passes $PASSES --one-shape --device $DEVICE --model $MODEL_DIR"
step encode_fp32 ${T:-75} $ENC --dtype float32 --precision highest --st-dtype float32
step encode_bf16 ${T:-75} $ENC --dtype bfloat16 --st-dtype bfloat16
step train_fp32 ${T:-115} $TRN --dtype float32 --precision highest --st-amp none
step train_bf16 ${T:-115} $TRN --dtype bfloat16 --st-amp bfloat16
step train_k16 ${T:-70} bench/train.py --which ours --batch-sizes ${TB%% *} --steps $KSTEPS --passes $PASSES \
  --one-shape --steps-per-dispatch $K --dtype float32 --precision highest --model "$MODEL_DIR"
if [ "${GPU_BENCH_EXTRA:-0}" = 1 ]; then
  step train_k32 ${T:-80} bench/train.py --which ours --batch-sizes ${TB%% *} --steps $((KSTEPS * 2)) \
    --passes $PASSES --one-shape --steps-per-dispatch $((K * 2)) --dtype float32 --model "$MODEL_DIR"
fi

say ""
say "## summary (medians; ratio = ours / sentence-transformers throughput)"
$PY - "$LOGDIR" <<'EOF' 2>&1 | tee -a "$LOG"
import json, statistics, sys
from pathlib import Path

d = Path(sys.argv[1])
def load(name):
    p = d / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None

rows = []
for name, label in (("encode_fp32", "encode fp32 (highest)"), ("encode_bf16", "encode bf16")):
    r = load(name)
    if not r:
        continue
    n = int(r["argv"][r["argv"].index("--n") + 1])
    label += " (partial: timed out)" if r.get("partial") else ""
    for bs in r["results"]["ours"]:
        o = n / statistics.median(r["results"]["ours"][bs]["seconds"])
        st = r["results"].get("st", {}).get(bs)
        s = n / statistics.median(st["seconds"]) if st else float("nan")
        rows.append((label, bs, "sentences/s", f"{o:,.0f}", f"{s:,.0f}" if st else "-", f"{o / s:.2f}x" if st else "-"))
for name, label in (("train_fp32", "train fp32 (highest)"), ("train_bf16", "train bf16"),
                    ("train_k16", "train fp32, ours K="), ("train_k32", "train fp32, ours K=")):
    r = load(name)
    if not r:
        continue
    steps = int(r["argv"][r["argv"].index("--steps") + 1])
    if label.endswith("K="):
        label += r["argv"][r["argv"].index("--steps-per-dispatch") + 1]
    label += " (partial: timed out)" if r.get("partial") else ""
    for bs in r["results"]["ours"]:
        o = 1000 * statistics.median(x["seconds"] for x in r["results"]["ours"][bs]["runs"]) / steps
        st = r["results"].get("st", {}).get(bs)
        s = 1000 * statistics.median(x["seconds"] for x in st["runs"]) / steps if st else float("nan")
        rows.append((label, bs, "ms/step", f"{o:.1f}", f"{s:.1f}" if st else "-", f"{s / o:.2f}x" if st else "-"))
head = ("run", "batch", "unit", "minilm_jax", "sentence-transformers", "ratio")
w = [max(len(str(x[i])) for x in rows + [head]) for i in range(len(head))]
print("| " + " | ".join(h.ljust(n) for h, n in zip(head, w)) + " |")
print("|" + "|".join("-" * (n + 2) for n in w) + "|")
for row in rows:
    print("| " + " | ".join(str(c).ljust(n) for c, n in zip(row, w)) + " |")
if not rows:
    print("(no step finished)")
k1 = load("train_fp32")
for kk in (load("train_k16"), load("train_k32")):
    if not (k1 and kk):
        continue
    bs = next(iter(kk["results"]["ours"]), None)
    if bs in k1["results"]["ours"]:
        def ms(r):
            steps = int(r["argv"][r["argv"].index("--steps") + 1])
            return 1000 * statistics.median(x["seconds"] for x in r["results"]["ours"][bs]["runs"]) / steps
        k = kk["argv"][kk["argv"].index("--steps-per-dispatch") + 1]
        print(f"ours, batch {bs}, float32: {ms(k1):.1f} ms/step with 1 step per dispatch, {ms(kk):.1f} ms/step "
              f"with {k} ({ms(k1) / ms(kk):.2f}x)")
EOF
say "log: $LOG"
