#!/usr/bin/env python
"""M-BEIR evaluation of one checkpoint (local protocol by default).

    python scripts/vtools_eval_mbeir_model.py --model PATH --mbeir-root DIR --output DIR \
        [--tasks a,b] [--split test|val] [--instruction random|first] [--seed N] [--batch-size N] \
        [--protocol local|global] [--device D] [--dtype T] [--cache-dir DIR] [--backend torch|faiss] \
        [--allow-missing] [--compat default|official] [--config configs/eval/mbeir_local.yaml [--set key=value ...]]

Same options as ``umarvel eval mbeir``; works under ``torchrun`` (encoding sharded over ranks, rank 0
searches and writes). Outputs: results.json, results.md, config.yaml, run.json, runs/<task>_<split>.trec.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from umarvel.commands.eval import mbeir_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(mbeir_main(prog="vtools_eval_mbeir_model.py"))
