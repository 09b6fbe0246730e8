#!/bin/sh
# Zero-shot benchmark suite (CIRCO, GeneCIS, Flickr30K, COCO 5K, ShareGPT4V, Urban1K, VisDial, VIST, CC-Neg,
# Sugar-Crepe, MSVD, MSR-VTT) with one checkpoint.
#
#   sh scripts/eval_zeroshot.sh MODEL DATA_ROOT OUTPUT_DIR [--tasks circo,msrvtt,...] [more options]
#
# Extra options go to `umarvel eval zeroshot` (see `python -m umarvel.commands.eval_zeroshot --help`), e.g.
# --device cuda --batch-size 64 --cache-dir DIR, or --compat official to reproduce the published numbers with
# the official evaluation numerics (docs/decisions.md, "Compatibility mode"; results.json records the mode).
# Sets absent under DATA_ROOT are skipped with a line saying so.
# Writes OUTPUT_DIR/metrics/<task>.json, OUTPUT_DIR/results.json, OUTPUT_DIR/results.md and, for CIRCO test,
# OUTPUT_DIR/circo_test_submission.json. Python: $UMARVEL_PYTHON, else the repository's .venv
# (create it with `bash scripts/setup_env.sh`).
set -eu
if [ "$#" -lt 3 ]; then
  echo "usage: sh $0 MODEL DATA_ROOT OUTPUT_DIR [--tasks circo,msrvtt,...] [options]" >&2
  exit 2
fi
ROOT=$(CDPATH= cd -- "$(dirname -- "$0")/.." && pwd)
PY=${UMARVEL_PYTHON:-$ROOT/.venv/bin/python}
if [ ! -x "$PY" ]; then
  echo "no Python at $PY: run 'bash scripts/setup_env.sh' first (or set UMARVEL_PYTHON)" >&2
  exit 2
fi
MODEL=$1
DATA_ROOT=$2
OUTPUT_DIR=$3
shift 3
export TOKENIZERS_PARALLELISM=false
exec "$PY" -m umarvel.commands.eval_zeroshot --model "$MODEL" --data-root "$DATA_ROOT" --output-dir "$OUTPUT_DIR" "$@"
