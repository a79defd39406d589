#!/usr/bin/env bash
# Create .venv and install alignkit with its test tools. Installs torch==2.13.0 (the CPU build
# this machine keeps on disk) only when no torch is importable yet, so a GPU user's own torch
# is kept and an unpinned CUDA build is never pulled here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install --quiet "torch==2.13.0"
fi
.venv/bin/pip install --quiet -e ".[dev]"
