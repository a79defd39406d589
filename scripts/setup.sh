#!/usr/bin/env bash
# Create .venv and install alignkit with its test tools. Installs torch==2.13.0 (the CPU build
# this machine keeps on disk) only when no torch is importable yet, so a GPU user's own torch
# is kept and an unpinned CUDA build is never pulled here.
#
#   scripts/setup.sh         # alignkit + test tools (enough for the demo and most tests)
#   scripts/setup.sh --all   # also the trackers (wandb, mlflow, swanlab), DeepSpeed with its CPU
#                            # extension compiled (scripts/setup_deepspeed.sh) and the vLLM CPU
#                            # environment .venv-vllm (scripts/setup_vllm.sh): what CI tests
# Every step is skipped when already done, so a re-run costs seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install --quiet "torch==2.13.0"
fi
if [ "${1:-}" = "--all" ]; then
  .venv/bin/pip install --quiet -e ".[dev,trackers]"
  ./scripts/setup_deepspeed.sh
  ./scripts/setup_vllm.sh
else
  .venv/bin/pip install --quiet -e ".[dev]"
fi
