#!/usr/bin/env bash
# Stage 1, NLI (text only). Data: data.path=<nli_for_simcse.csv>
# Config: configs/stages/01_nli.yaml (published hyperparameters; init_from chains to the previous stage's merged
# output, D1). Any extra argument is a dotted override passed to `umarvel train`. Launch settings come from the
# environment: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, GPUS_PER_NODE (one node with all visible GPUs by default).
#
#   scripts/train_stage1_nli.sh                                   # one node
#   NNODES=8 NODE_RANK=$i MASTER_ADDR=node0 GPUS_PER_NODE=8 scripts/train_stage1_nli.sh   # on each of 8 nodes
#
# Tiny CPU run (seconds): a random tiny model and generated data, a few steps, no DeepSpeed:
#   .venv/bin/python -c "from umarvel.model.tiny import save_tiny_checkpoint as s; s('/tmp/tiny')"
#   .venv/bin/python -m umarvel.train.toy_data /tmp/toy
#   GPUS_PER_NODE=1 scripts/train_stage1_nli.sh init_from=/tmp/tiny data.path=/tmp/toy/nli.csv train.output_dir=/tmp/run/01_nli \
#       model.dtype=float32 train.deepspeed=null train.max_steps=2 train.per_device_batch_size=4 \
#       lora.r=8 lora.alpha=16 data.num_workers=0
# Relative paths in the config and overrides are relative to the current directory.
# The run resumes from its last checkpoint when relaunched (train.resume=auto).
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "$DIR/_train_launch.sh" "$DIR/../configs/stages/01_nli.yaml" "$@"
