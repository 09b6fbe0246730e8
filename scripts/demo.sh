#!/usr/bin/env bash
# The demo command: set up ./.venv if needed, then run `umarvel demo` (extra arguments are passed through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export TOKENIZERS_PARALLELISM=false
exec .venv/bin/umarvel demo "$@"
