#!/usr/bin/env bash
# One PPO step with rollout.engine: vllm_server on a GPU (bf16, TP 1), then rollout tokens/s of the
# server vs the hf engine on the same model and prompts (bench/rollout_engines.py, bf16).
# Needs: a CUDA GPU, the trainer's env (.venv) and an env with CUDA vLLM (default .venv-vllm;
# override with ALIGNKIT_VLLM_PYTHON). Not run on the CPU-only machines this was written on.
#   scripts/gpu_server_step.sh [MODEL_DIR]     # default: builds the 50M test model
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export ALIGNKIT_VLLM_PYTHON=${ALIGNKIT_VLLM_PYTHON:-$PWD/.venv-vllm/bin/python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU: this script needs one')"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
MODEL=${1:-}
if [ -z "$MODEL" ]; then
  MODEL=$WORK/model50m
  "$PY" -c "from alignkit.models.tiny import build_tiny; build_tiny('$MODEL', hidden_size=768, intermediate_size=2048, num_layers=8, num_heads=12, num_kv_heads=4, pretrain_steps=0)"
fi
# 1. One PPO step, the server started by alignkit on GPU 0 next to the trainer (TP 1, 40% of the GPU).
"$PY" -m alignkit.cli train examples/ppo_tiny.yaml model_name_or_path="$MODEL" adapter_name_or_path=null \
  output_dir="$WORK/run" dataset_dir=examples/data report_to=none plot_loss=false bf16=true max_steps=1 save_steps=100 \
  rollout.engine=vllm_server rollout.gpu_memory_utilization=0.4 rollout.sync_tolerance=0.1
"$PY" - "$WORK/run" <<'PY'
import sys
from alignkit.train.tracking import read_metrics
row = read_metrics(sys.argv[1])[-1]
print(f"PPO step 1 on the server: reward {row['env/reward_mean']:.3f}, "
      f"engine/trainer log-prob diff {row['rollout/engine_logprob_diff']:.4f}, step time {row.get('time/step', float('nan')):.1f} s")
PY
# 2. tokens/s, hf vs colocated vLLM vs the server, bf16 (the bench runs in the vLLM env: it imports vllm).
"$ALIGNKIT_VLLM_PYTHON" bench/rollout_engines.py --model "$MODEL" --dtype bfloat16 --prompts 64 --new-tokens 128 --repeats 3
