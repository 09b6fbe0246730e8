#!/usr/bin/env bash
# Stage 4, hard-negative fine-tune: union train + K=5 GLOBAL mined negatives per query, lr 1.5e-5, 17 queries per
# device, no suffix. Config: configs/stages/04_mbeir_hardneg.yaml (init_from: the merged stage-3 model, D1).
# Needs the global mined list of the stage-3 model first:
#   umarvel mine --model outputs/03_mbeir/merged --mbeir-root data/M-BEIR --output outputs/mined/stage3
# Any extra argument is a dotted override passed to `umarvel train` (e.g. data.root=/data/M-BEIR
# data.negatives=/runs/mined/rerank_data_all_eval_train_global.jsonl data.hard_negative_margin=0.05).
# Launch settings come from the environment: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, GPUS_PER_NODE.
#
#   scripts/train_stage4_hardneg.sh                                                    # one node
#   NNODES=8 NODE_RANK=$i MASTER_ADDR=node0 GPUS_PER_NODE=8 scripts/train_stage4_hardneg.sh   # on each of 8 nodes
#
# Tiny CPU run: see scripts/train_umarvel.sh (UMARVEL_TINY=1 runs the whole chain on generated data).
# The run resumes from its last checkpoint when relaunched (train.resume=auto).
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "$DIR/_train_launch.sh" "$DIR/../configs/stages/04_mbeir_hardneg.yaml" "$@"
