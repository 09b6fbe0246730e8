#!/usr/bin/env bash
# The test command: set up ./.venv if needed, then run the whole CPU test suite.
#   bash scripts/test.sh            # all tests
#   bash scripts/test.sh -k golden  # extra pytest arguments are passed through
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false UMARVEL_NO_PROGRESS=1
exec .venv/bin/python -m pytest -q tests "$@"
