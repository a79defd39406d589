#!/usr/bin/env bash
# The async RL bench (bench/async_rl.py) on a GPU with vLLM in bf16: sync (async_level 0) against
# k = 1 and k = 2, the judge server adding 0, 1 and 3 s a request; first with vLLM's OpenAI server
# (rollout.engine: vllm_server, started once by the bench on the trainer's GPU, 40% of its memory),
# then with colocated vLLM (rollout.engine: vllm; the bench runs in the vLLM env, which imports vllm).
# Needs: a CUDA GPU, the trainer's env (.venv) and an env with CUDA vLLM (default .venv-vllm; override
# with ALIGNKIT_VLLM_PYTHON). Not run on the CPU-only machines this was written on.
#   scripts/gpu_async_bench.sh [MODEL_DIR]     # default: the bench's reference tiny model
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export ALIGNKIT_VLLM_PYTHON=${ALIGNKIT_VLLM_PYTHON:-$PWD/.venv-vllm/bin/python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU: this script needs one')"
MODEL=()
if [ -n "${1:-}" ]; then MODEL=(--model "$1"); fi
COMMON=(--bf16 --latencies 0,1,3 --levels 0,1,2 --steps 8 --warmup 3 "${MODEL[@]}")
"$PY" bench/async_rl.py --engine vllm_server --gpu-memory-utilization 0.4 "${COMMON[@]}"
"$ALIGNKIT_VLLM_PYTHON" bench/async_rl.py --engine vllm "${COMMON[@]}"
