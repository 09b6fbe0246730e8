#!/usr/bin/env bash
# Shared launcher of scripts/train_stage*.sh: torchrun on one or many nodes, then `umarvel train CONFIG ...`.
# Environment (defaults = one node):
#   NNODES (1)  NODE_RANK (0)  MASTER_ADDR (127.0.0.1)  MASTER_PORT (29500)
#   GPUS_PER_NODE (number of visible GPUs, or 1 without GPUs)  PYTHON (the repo's .venv/bin/python, else python3)
# Usage: scripts/_train_launch.sh CONFIG [key=value ...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
  GPUS_PER_NODE=$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
CONFIG="$1"; shift
echo "[umarvel] $CONFIG on ${NNODES} node(s) x ${GPUS_PER_NODE} process(es), node rank ${NODE_RANK}, master ${MASTER_ADDR}:${MASTER_PORT}" >&2
exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m umarvel.commands.train "$CONFIG" "$@"
