#!/usr/bin/env bash
# Stage 5, reranker distillation (the final U-MARVEL): the 10% union subset x the 50 fused teacher candidates per
# query, KL(teacher || student) only, lr 1e-5, 2 queries per device, no suffix, 224*224 image budget.
# Config: configs/stages/05_mbeir_distill.yaml (init_from: the merged stage-4 model).
# Needs, in order: the subset (umarvel mine on the stage-3 model), the stage-4 model's LOCAL lists of the subset
# (umarvel mine --queries <subset> --scope local --no-subset), a trained reranker (umarvel rerank train) and the
# teacher file (umarvel teacher configs/teacher/teacher.yaml ...). scripts/train_umarvel.sh runs all of them.
# Any extra argument is a dotted override passed to `umarvel train` (e.g. model.max_pixels=235200).
# Launch settings come from the environment: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, GPUS_PER_NODE.
# The run resumes from its last checkpoint when relaunched (train.resume=auto).
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "$DIR/_train_launch.sh" "$DIR/../configs/stages/05_mbeir_distill.yaml" "$@"
