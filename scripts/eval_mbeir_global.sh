#!/bin/sh
# M-BEIR global evaluation (D8): each task's queries against the 16 local pools concatenated, no
# modality filter, no dedup. Reuses the embedding cache of an earlier local run: the cache defaults to
# <OUTPUT_DIR>/../cache, so run local into e.g. outputs/mbeir/local and global into outputs/mbeir/global
# (results.md then shows both protocols side by side), or pass --cache-dir.
#
#   sh scripts/eval_mbeir_global.sh MODEL MBEIR_ROOT OUTPUT_DIR [extra args of vtools_eval_mbeir_model.py]
#
# Add --compat official to reproduce the published numbers with the official evaluation numerics
# (docs/decisions.md, "Compatibility mode"); results.json records the mode.
#
# GPUS_PER_NODE=N (N > 1) launches N ranks with torchrun (encoding sharded, rank 0 searches).
# PYTHON / TORCHRUN override the interpreter / launcher (default: the repo's .venv when present).
set -eu

if [ "$#" -lt 3 ]; then
    echo "usage: sh $0 MODEL MBEIR_ROOT OUTPUT_DIR [extra args]" >&2
    exit 2
fi
MODEL=$1
MBEIR_ROOT=$2
OUTPUT_DIR=$3
shift 3

REPO=$(CDPATH= cd -- "$(dirname -- "$0")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
GPUS=${GPUS_PER_NODE:-1}
case "$GPUS" in
    ''|*[!0-9]*) echo "GPUS_PER_NODE must be a positive integer, got '$GPUS'" >&2; exit 2 ;;
esac

if [ "$GPUS" -gt 1 ]; then
    if [ -z "${TORCHRUN:-}" ]; then
        PYDIR=$(dirname -- "$PYTHON")
        if [ -x "$PYDIR/torchrun" ]; then TORCHRUN="$PYDIR/torchrun"; else TORCHRUN=torchrun; fi
    fi
    exec "$TORCHRUN" --standalone --nproc_per_node "$GPUS" "$REPO/scripts/vtools_eval_mbeir_model.py" \
        --protocol global --model "$MODEL" --mbeir-root "$MBEIR_ROOT" --output "$OUTPUT_DIR" "$@"
fi
exec "$PYTHON" "$REPO/scripts/vtools_eval_mbeir_model.py" \
    --protocol global --model "$MODEL" --mbeir-root "$MBEIR_ROOT" --output "$OUTPUT_DIR" "$@"
