#!/usr/bin/env bash
# One GPU session: correctness first, then the benchmark table. Run from the repo root on the GPU machine:
#   GOLDEN=.device/golden/umarvel_tiny bash bench/run_gpu.sh
# (copy ../shared/golden/umarvel_tiny to .device/golden/ first; .device/ is git-ignored).
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" UMARVEL_NO_PROGRESS=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python}
GOLDEN=${GOLDEN:-.device/golden/umarvel_tiny}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
echo "== golden parity on the GPU"; timeout 120 $PY bench/gpu_check.py --golden "$GOLDEN" 2>&1 | grep -v -i warn
echo "== encode, 7B shape"; timeout 200 $PY bench/encode.py --shape 7b --device cuda --n ${ENCODE_N:-2048} 2>&1 | grep -v -i warn | tail -6
echo "== exact search, M-BEIR global shape"; timeout 240 $PY bench/search.py --shape mbeir --device cuda --check ${SEARCH_ARGS:-} 2>&1 | tail -8
if [ -n "${TRAIN:-}" ]; then
  echo "== train step, 7B shape"; timeout 240 $PY bench/train.py --shape 7b --device cuda --pairs 60 --steps 2 2>&1 | grep -v -i warn | tail -8
fi
