#!/usr/bin/env bash
# One GPU session for issue 11 (packed forward), from the repo root:
#   mkdir -p .gpu && cp -r ../shared/bench_anchors .gpu/anchors      # .gpu/ is git-ignored
#   OUT=$OUT bash bench/run_gpu.sh            # needs torch, transformers, peft, accelerate; no network
#   bash bench/run_gpu.sh --tiny              # dry run of every part on the CPU with tiny shapes
# Parts (each guarded by its own timeout; one failing part does not stop the others; a global budget of
# BUDGET seconds, default 420, shrinks the later parts' limits and skips what no longer fits):
#   a  correctness: bf16 packed vs padded min cosine (7B widths, UMARVEL_GPU_LAYERS layers) and fp32 parity
#      (tests/model/test_packed_gpu.py); golden parity too when GOLDEN points at golden/umarvel_tiny
#   b  bench/train.py: reference style vs packed variants (fused AdamW, bf16 LoRA compute, selective / no
#      checkpointing), 7B shape, LoRA r=128, 60 pairs; pairs/s, P/R, peak memory, TFLOP/s vs peak; profile
#   c  bench/encode.py: reference style vs sorted-padded vs packed, items/s, P/R, busy fraction; profile
#   d  the stand-alone anchors gpu_train_anchor.py and gpu_anchor.py (encode only) from $ANCHORS
# Limits per part: LIM_A LIM_B LIM_C LIM_D1 LIM_D2 (seconds); TRAIN_VARIANTS: a comma list for bench/train.py.
# stdout gets the compact lines; full logs and JSON go to $OUT (default .gpu/out).
set -u
TINY=0
[ "${1:-}" = "--tiny" ] && TINY=1
OUT=${OUT:-.gpu/out}
ANCHORS=${ANCHORS:-.gpu/anchors}
BUDGET=${BUDGET:-420}
PY=${PYTHON:-python}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" UMARVEL_NO_PROGRESS=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
if [ $TINY = 1 ]; then
  DEV=cpu; SHAPE=tiny; SIZE=tiny; N=${ENCODE_N:-96}; PAIRS=${PAIRS:-6}; STEPS=1; LAYERS=${UMARVEL_GPU_LAYERS:-2}
  LIM_A=240; LIM_B=400; LIM_C=300; LIM_D1=200; LIM_D2=200; BUDGET=${BUDGET_TINY:-1500}
else
  DEV=cuda; SHAPE=7b; SIZE=7b; N=${ENCODE_N:-1024}; PAIRS=${PAIRS:-60}; STEPS=${STEPS:-2}; LAYERS=${UMARVEL_GPU_LAYERS:-4}
  LIM_A=${LIM_A:-100}; LIM_B=${LIM_B:-200}; LIM_C=${LIM_C:-130}; LIM_D1=${LIM_D1:-100}; LIM_D2=${LIM_D2:-90}
fi
export UMARVEL_GPU_LAYERS=$LAYERS
T0=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

# part NAME LIMIT FILTER CMD...: run CMD with min(LIMIT, budget left) seconds, log to $OUT/NAME.log, print the
# lines matching FILTER (an extended regex) and a status line.
part() {
  local name=$1 limit=$2 filter=$3
  shift 3
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  if [ $left -lt 25 ]; then
    echo "== $name: skipped (budget of ${BUDGET}s spent)"; echo "$name skipped" >> "$SUMMARY"; return
  fi
  [ $limit -gt $left ] && limit=$left
  echo "== $name (limit ${limit}s)"
  local start=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$? secs=$(( $(date +%s) - start ))
  grep -E "$filter" "$OUT/$name.log" | grep -v -i -E "warn|deprecat" | cut -c1-260
  local status=ok
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="TIMEOUT"
  [ $rc -ne 0 ] && [ "$status" = ok ] && status="FAILED rc=$rc (tail below)" && tail -5 "$OUT/$name.log" | cut -c1-260
  echo "-- $name: $status, ${secs}s"
  printf '%-14s %-28s %4ss\n' "$name" "$status" "$secs" >> "$SUMMARY"
}

echo "== environment"
{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; } \
  2>&1 | tee "$OUT/env.log"
$PY - <<'EOF' 2>&1 | grep -v -i warn | tee -a "$OUT/env.log"
import importlib.util, torch, transformers, peft
from umarvel.model.attention import available_kernels, select_kernel
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
      "flash_attn", importlib.util.find_spec("flash_attn") is not None,
      "torch varlen", importlib.util.find_spec("torch.nn.attention.varlen") is not None)
print("packed kernels bf16:", available_kernels(dev, torch.bfloat16), "-> auto:", select_kernel(dev, torch.bfloat16),
      "| fp32 -> auto:", select_kernel(dev, torch.float32))
EOF

FILTER_A="packed check|fp32 parity|passed|failed|PASS|FAIL|Error"
if [ $TINY = 1 ]; then
  part a_correctness $LIM_A "$FILTER_A" $PY tests/model/test_packed_gpu.py --device cpu --tiny --layers "$LAYERS"
else
  part a_correctness $LIM_A "$FILTER_A" $PY -m pytest -q -s -p no:cacheprovider tests/model/test_packed_gpu.py
fi
if [ -n "${GOLDEN:-}" ] && [ -d "${GOLDEN:-}" ]; then
  part a_golden 120 "PASS|FAIL|ok$|device" $PY bench/gpu_check.py --golden "$GOLDEN" --device $DEV
fi

FILTER_T="^device|pairs/s|out of memory|Error|speedup|== profile|^wall|host syncs|^ +Name|^ +[A-Za-z_:].*  [0-9.]+(ms|us|s) "
part b_train $LIM_B "$FILTER_T" $PY bench/train.py --shape $SHAPE --device $DEV --pairs "$PAIRS" --steps "$STEPS" \
  ${TRAIN_VARIANTS:+--variants "$TRAIN_VARIANTS"} --profile --json "$OUT/train.json"

FILTER_E="^device|items/s|failed|min cosine|speed-up|== profile|^wall|host syncs|^ +Name|^ +[A-Za-z_:].*  [0-9.]+(ms|us|s) "
part c_encode $LIM_C "$FILTER_E" $PY bench/encode.py --shape $SHAPE --device $DEV --n "$N" --profile \
  --json "$OUT/encode.json"

if [ -f "$ANCHORS/gpu_train_anchor.py" ]; then
  part d_train_anchor $LIM_D1 "^(reference|sorted) " $PY "$ANCHORS/gpu_train_anchor.py" --size $SIZE --pairs "$PAIRS" \
    --steps "$STEPS" --out "$OUT/anchors"
  part d_encode_anchor $LIM_D2 "^(reference_style|length_sorted)" $PY "$ANCHORS/gpu_anchor.py" --size $SIZE \
    --items "$N" --skip-search --out "$OUT/anchors"
else
  echo "== anchors: $ANCHORS/gpu_train_anchor.py not found (copy ../shared/bench_anchors to $ANCHORS)"
  echo "anchors        missing" >> "$SUMMARY"
fi

echo "== summary ($(( $(date +%s) - T0 ))s in all; logs in $OUT)"
cat "$SUMMARY"
