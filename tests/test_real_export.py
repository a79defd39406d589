"""The real model's PPO export served: SmolLM2-135M-Instruct, two PPO steps (LoRA, with a critic) on the
verifiable brief task, ``alignkit export --vllm-check`` (vLLM and transformers agree on greedy tokens
and first-token log-probs), then ``alignkit chat`` on the export answers in words.

Needs the GGUF (``scripts/setup.sh --real``) and a Python with vLLM (.venv-vllm, ``scripts/setup_vllm.sh``),
in which the export runs as ``alignkit demo --real`` runs it; skipped with that hint otherwise.
Measured: 8.3 min wall, 3.2 min CPU, on 2 busy shared cores (two PPO steps, the merge, vLLM's CPU
engine start, chat); vLLM check: fp32, greedy 3/3 equal, first-token log-prob |diff| 3.3e-5.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.config import load_config
from alignkit.models.gguf import convert_gguf
from alignkit.tools.demo_real import export_with_vllm_check
from alignkit.train import ppo
from tests import real_task
from tests.real_judge import smollm2_judge

ROOT = Path(__file__).resolve().parents[1]
GGUF, MISSING = smollm2_judge()  # the model and a Python with vLLM: what this test needs too
pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING is not None, reason=str(MISSING))]


def test_ppo_export_of_smollm2_passes_the_vllm_check_and_chats(tmp_path):
    run = ppo.run(load_config(None, [
        "stage=ppo", f"model_name_or_path={convert_gguf(GGUF)}", "template=auto", "dataset=brief",
        f"dataset_dir={real_task.write_dataset(tmp_path / 'data')}", "finetuning_type=lora", "lora_rank=16", "lora_alpha=32",
        "lora_target=q_proj,k_proj,v_proj,o_proj", f"output_dir={tmp_path / 'run'}", "report_to=none",
        "plot_loss=false", "per_device_train_batch_size=4", "ppo_buffer_size=1", "ppo_epochs=1",
        "max_new_tokens=16", "learning_rate=5e-4", "max_steps=2", "save_steps=1000", "seed=0",
        "reward_model_type=rule", "reward_model=tests.real_task:brief_answer"]))
    export = tmp_path / "export"
    report = export_with_vllm_check(run, export)  # `alignkit export --vllm-check` in the vLLM Python
    vllm = report["vllm"]
    print(f"vLLM check: {vllm['status']}, greedy tokens equal {vllm.get('greedy_tokens_equal')}, first-token "
          f"log-prob max |diff| {vllm.get('first_token_logprob_max_abs_diff')}, samples {vllm.get('samples')}")
    assert vllm["status"] == "ran" and vllm["ok"], vllm
    assert vllm["dtype"] == "float32" and vllm["first_token_logprob_max_abs_diff"] < 1e-3, vllm
    assert report["passed"] is True
    assert (export / "extras" / "value_head.safetensors").is_file()  # the critic, kept out of the weights

    res = subprocess.run([sys.executable, "-m", "alignkit.cli", "chat", "--model", str(export),
                          "--max_new_tokens", "32"], input="Write one sentence about a cat.\n", capture_output=True,
                         text=True, timeout=600, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    reply = res.stdout.split("Assistant:", 1)[1].split("User:", 1)[0].strip()
    words = reply.lower().replace(".", " ").replace(",", " ").split()
    print(f"chat on the export: {reply!r}")
    assert "cat" in words and len(words) >= 4, reply
    assert sum(w.isalpha() for w in words) >= 0.8 * len(words), reply
