#!/usr/bin/env bash
# Create ./.venv (if missing) and install umarvel with its dependencies into it.
# torch is installed first and pinned to a CPU-friendly build when absent: a bare `torch` requirement
# on a machine without torch would pull a multi-GB CUDA build. On a GPU machine, install the torch
# build you want into the venv first (or set UMARVEL_TORCH="torch==X.Y.Z") and this keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  "$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$VPY" -m pip install -q "${UMARVEL_TORCH:-torch==2.13.0}" || "$VPY" -m pip install -q torch
fi
# Reinstall only when the package metadata changed (keeps repeated runs fast).
stamp=.venv/.umarvel-installed
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ requirements.txt -nt "$stamp" ]; then
  "$VPY" -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
