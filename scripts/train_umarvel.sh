#!/usr/bin/env bash
# The whole U-MARVEL recipe, in order (method spec section 0):
#   stage1 (NLI) -> stage2 (CC3M) -> stage3 (M-BEIR) -> mine3 (stage-3 top 100, local + global, 10% subset)
#   -> rerank (point-wise reranker on the local lists) -> stage4 (5 global hard negatives)
#   -> mine4 (stage-4 local top 100 of the subset) -> teacher (P(yes) of the top 50, cos + w_task * P(yes))
#   -> stage5 (distillation, the final U-MARVEL: $OUT/05_mbeir_distill/merged)
#   with PLUS=1 also U-MARVEL+: mine5 -> rerank_plus -> eval_val -> plus_val (w chosen on val) -> eval_test -> plus_test
#
# Every step writes a completion marker $OUT/.done/<step> atomically when it has finished; a rerun skips
# completed steps, and an interrupted step resumes (training from its last checkpoint, mining / teacher /
# evaluation from their cached shards and parts). Delete a marker (and the step's folder) to redo a step.
#
# Environment (defaults in brackets):
#   OUT [outputs/umarvel]            run folder (made absolute)
#   MBEIR_ROOT [data/M-BEIR]         M-BEIR root
#   NLI_CSV [data/nli_for_simcse.csv]  CC3M_JSON [data/cc3m-595k/train_anno.json]  CC3M_ROOT [dir of CC3M_JSON]
#   BASE_MODEL [checkpoints/hf_models/Qwen2-VL-7B-Instruct]   RERANK_BASE [$BASE_MODEL]
#   STEPS [all]                      space-separated subset of the step names above, run in recipe order
#   PLUS [0]                         1: also the U-MARVEL+ steps
#   TRAIN_ARGS / RERANK_ARGS / MINE_ARGS / TEACHER_ARGS / EVAL_ARGS  extra options appended to every such step
#   NNODES NODE_RANK MASTER_ADDR MASTER_PORT GPUS_PER_NODE   torchrun layout of the training stages
#   PYTHON [.venv/bin/python, else python3]
#   UMARVEL_TINY [0]                 1: the tiny CPU chain (seconds per step): generated data and a random tiny
#                                    model under $OUT/tiny, 1 optimiser step per stage, float32, no DeepSpeed.
#
#   scripts/train_umarvel.sh                                   # the published chain (multi-GPU via torchrun)
#   UMARVEL_TINY=1 OUT=/tmp/umarvel_tiny scripts/train_umarvel.sh   # CPU smoke run of every step
set -eu
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHON
OUT="${OUT:-outputs/umarvel}"
mkdir -p "$OUT/.done"
OUT="$(cd "$OUT" && pwd)"
TINY="${UMARVEL_TINY:-0}"
PLUS="${PLUS:-0}"
TRAIN_ARGS="${TRAIN_ARGS:-}"; RERANK_ARGS="${RERANK_ARGS:-}"; MINE_ARGS="${MINE_ARGS:-}"
TEACHER_ARGS="${TEACHER_ARGS:-}"; EVAL_ARGS="${EVAL_ARGS:-}"

log() { echo "[train_umarvel] $*" >&2; }

if [ "$TINY" = "1" ]; then
  T="$OUT/tiny"
  if [ ! -f "$T/ready" ]; then
    log "tiny mode: generating data and a tiny model under $T"
    "$PYTHON" - "$T" <<'PY'
import sys
from pathlib import Path
from umarvel.data.synthetic import make_synthetic_mbeir
from umarvel.model.tiny import save_tiny_checkpoint
from umarvel.train.toy_data import make_toy_cc3m, make_toy_nli
t = Path(sys.argv[1])
make_toy_nli(t / "nli.csv", 8)
make_toy_cc3m(t / "cc3m", 8, image_size=32)
make_synthetic_mbeir(t / "mbeir", seed=0, n_queries_per_task=2, n_candidates_per_task=5, image_size=32,
                     n_train_queries_per_task=4, tasks=("mscoco_task0", "webqa_task1"))
save_tiny_checkpoint(t / "base", seed=0)
(t / "ready").write_text("ok\n")
PY
  fi
  MBEIR_ROOT="$T/mbeir"; NLI_CSV="$T/nli.csv"; CC3M_JSON="$T/cc3m/train_anno.json"; BASE_MODEL="$T/base"
  export GPUS_PER_NODE=1
  TRAIN_ARGS="model.dtype=float32 model.gradient_checkpointing=false train.deepspeed=null train.max_steps=1 \
train.save_steps=1 train.per_device_batch_size=2 lora.r=4 lora.alpha=8 data.num_workers=0 train.device=cpu \
train.report_to=[] $TRAIN_ARGS"
  RERANK_ARGS="model.dtype=float32 model.gradient_checkpointing=false data.num_workers=0 lora.r=4 lora.alpha=8 \
train.per_device_queries=2 train.gradient_accumulation_steps=1 train.max_steps=1 train.bf16=false train.device=cpu \
$RERANK_ARGS"
  MINE_ARGS="--top-k 5 --subset-fraction 0.5 --device cpu --dtype float32 $MINE_ARGS"
  TEACHER_ARGS="top_k=3 device=cpu dtype=float32 $TEACHER_ARGS"
  EVAL_ARGS="--device cpu --dtype float32 $EVAL_ARGS"
  S4_ARGS="data.num_hard_negatives=2"
  S5_ARGS="data.num_candidates=3 train.per_device_batch_size=1"
  PLUS_ARGS="--top-k 5 --device cpu --dtype float32"
fi
MBEIR_ROOT="${MBEIR_ROOT:-data/M-BEIR}"
NLI_CSV="${NLI_CSV:-data/nli_for_simcse.csv}"
CC3M_JSON="${CC3M_JSON:-data/cc3m-595k/train_anno.json}"
CC3M_ROOT="${CC3M_ROOT:-$(dirname "$CC3M_JSON")}"
BASE_MODEL="${BASE_MODEL:-checkpoints/hf_models/Qwen2-VL-7B-Instruct}"
RERANK_BASE="${RERANK_BASE:-$BASE_MODEL}"
S4_ARGS="${S4_ARGS:-}"; S5_ARGS="${S5_ARGS:-}"; PLUS_ARGS="${PLUS_ARGS:-}"
MBEIR_FILES="data.root=$MBEIR_ROOT data.pool=$MBEIR_ROOT/cand_pool/global/mbeir_union_train_cand_pool.jsonl \
data.instructions=$MBEIR_ROOT/instructions/query_instructions.tsv"
SUBSET="$OUT/mined/stage3/mbeir_union_up_train_10percent.jsonl"

# step NAME COMMAND...: run COMMAND unless $OUT/.done/NAME exists (and NAME is selected), then mark it done.
step() {
  name="$1"; shift
  if [ -n "${STEPS:-}" ]; then
    case " $STEPS " in *" $name "*) ;; *) log "$name: not selected"; return 0 ;; esac
  fi
  if [ -f "$OUT/.done/$name" ]; then log "$name: already complete, skipped"; return 0; fi
  log "$name: running"
  "$@"
  tmp="$OUT/.done/.$name.$$"
  { date -u '+%Y-%m-%dT%H:%M:%SZ'; printf '%s\n' "$*"; } > "$tmp"
  mv -f "$tmp" "$OUT/.done/$name"
  log "$name: complete"
}

py_train() { "$PYTHON" -m umarvel.commands.train "$@"; }
train() {  # train CONFIG SCRIPT overrides...: torchrun launcher; the tiny chain runs one process directly
  cfg="$1"; script="$2"; shift 2
  if [ "$TINY" = "1" ]; then
    # shellcheck disable=SC2086
    py_train "$ROOT/configs/stages/$cfg" "$@" $TRAIN_ARGS
  else
    # shellcheck disable=SC2086
    "$ROOT/scripts/$script" "$@" $TRAIN_ARGS
  fi
}
rerank_train() {  # rerank_train OUTPUT_DIR MINED_LOCAL
  # shellcheck disable=SC2086
  "$PYTHON" - "$ROOT/configs/rerank/reranker.yaml" "model.init_from=$RERANK_BASE" "data.mbeir_root=$MBEIR_ROOT" \
    "data.mined=$2" "train.output_dir=$1" $RERANK_ARGS <<'PY'
import sys
from umarvel.config import load_config
from umarvel.log import setup_logging
from umarvel.rerank.train import RerankTrainConfig, train_reranker
setup_logging("INFO")
train_reranker(load_config(sys.argv[1], RerankTrainConfig, sys.argv[2:]))
PY
}
mine() {  # mine MODEL OUTPUT args...
  m="$1"; o="$2"; shift 2
  # shellcheck disable=SC2086
  "$PYTHON" -m umarvel.commands.mine --model "$m" --mbeir-root "$MBEIR_ROOT" --output "$o" "$@" $MINE_ARGS
}
teacher() {
  # shellcheck disable=SC2086
  "$PYTHON" -m umarvel.commands.teacher "$ROOT/configs/teacher/teacher.yaml" "reranker=$OUT/rerank/merged" \
    "mbeir_root=$MBEIR_ROOT" "queries=$SUBSET" "mined=$OUT/mined/stage4_subset/rerank_data_all_eval_train_local.jsonl" \
    "output=$OUT/teacher" $TEACHER_ARGS
}
evaluate() {  # evaluate SPLIT
  # shellcheck disable=SC2086
  "$PYTHON" "$ROOT/scripts/vtools_eval_mbeir_model.py" --model "$OUT/05_mbeir_distill/merged" \
    --mbeir-root "$MBEIR_ROOT" --split "$1" --protocol local --output "$OUT/eval/$1/local" $EVAL_ARGS
}
plus() {  # plus SPLIT weight-args...
  s="$1"; shift
  # shellcheck disable=SC2086
  "$PYTHON" -m umarvel.commands.eval_plus --run "$OUT/eval/$s/local" --reranker "$OUT/rerank_plus/merged" \
    --output "$OUT/eval/$s/plus_local" "$@" $PLUS_ARGS
}

step stage1 train 01_nli.yaml train_stage1_nli.sh "init_from=$BASE_MODEL" "data.path=$NLI_CSV" "train.output_dir=$OUT/01_nli"
step stage2 train 02_cc3m.yaml train_stage2_cc3m.sh "init_from=$OUT/01_nli/merged" "data.path=$CC3M_JSON" "data.root=$CC3M_ROOT" \
  "train.output_dir=$OUT/02_cc3m"
# shellcheck disable=SC2086
step stage3 train 03_mbeir.yaml train_stage3_mbeir.sh "init_from=$OUT/02_cc3m/merged" $MBEIR_FILES \
  "data.path=$MBEIR_ROOT/query/union_train/mbeir_union_up_train.jsonl" "train.output_dir=$OUT/03_mbeir"
step mine3 mine "$OUT/03_mbeir/merged" "$OUT/mined/stage3" --scope both
step rerank rerank_train "$OUT/rerank" "$OUT/mined/stage3/rerank_data_all_eval_train_local.jsonl"
# shellcheck disable=SC2086
step stage4 train 04_mbeir_hardneg.yaml train_stage4_hardneg.sh "init_from=$OUT/03_mbeir/merged" $MBEIR_FILES \
  "data.path=$MBEIR_ROOT/query/union_train/mbeir_union_up_train.jsonl" \
  "data.negatives=$OUT/mined/stage3/rerank_data_all_eval_train_global.jsonl" "train.output_dir=$OUT/04_mbeir_hardneg" \
  $S4_ARGS
step mine4 mine "$OUT/04_mbeir_hardneg/merged" "$OUT/mined/stage4_subset" --queries "$SUBSET" --scope local --no-subset
step teacher teacher
# shellcheck disable=SC2086
step stage5 train 05_mbeir_distill.yaml train_stage5_distill.sh "init_from=$OUT/04_mbeir_hardneg/merged" $MBEIR_FILES "data.path=$SUBSET" \
  "data.scores=$OUT/teacher/fusion_results.jsonl" "train.output_dir=$OUT/05_mbeir_distill" $S5_ARGS
if [ "$PLUS" = "1" ]; then
  step mine5 mine "$OUT/05_mbeir_distill/merged" "$OUT/mined/stage5" --scope local --no-subset
  step rerank_plus rerank_train "$OUT/rerank_plus" "$OUT/mined/stage5/rerank_data_all_eval_train_local.jsonl"
  step eval_val evaluate val
  step plus_val plus val --choose-weight
  step eval_test evaluate test
  step plus_test plus test --weight-from "$OUT/eval/val/plus_local/fusion_weight.json"
fi
log "done: final U-MARVEL model $OUT/05_mbeir_distill/merged"
