"""GRPO on the verifiable task (tests/real_task.py) against a real LLM judge served by vLLM: pointwise
(``score_format: json``) against ``judge_mode: listwise``, a few steps each.

Policy: SmolLM2-135M-Instruct (LoRA); judge: SmolLM2-135M-Instruct by default, served by vLLM (CPU
build), replies capped at 48 tokens. Every rollout of every step goes to samples.jsonl, so the
judge's scores can be compared with the task's own graded check (``brief_answer``) on the run's own
groups. Prints per mode: judge requests per step, failed scores, the mean within-group Spearman of
the judge's scores against ``brief_answer`` (what GRPO's baseline uses), and the success rate of the
first and last step.

    PYTHONPATH=$PWD .venv/bin/python bench/listwise_grpo.py --steps 3
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from collections import defaultdict
from pathlib import Path
from statistics import mean
from types import SimpleNamespace

from alignkit.config import load_config
from alignkit.judge.llm import LLMJudgeProcess
from alignkit.models.gguf import convert_gguf, resolve_model_path, smollm2_gguf
from alignkit.rewards.drift import spearman
from alignkit.train import ppo
from alignkit.train.tracking import read_metrics
from tests import real_task

PROMPTS, GROUP = 4, 4
RECIPE = ["advantage_estimator=grpo", f"num_generations={GROUP}", "per_device_train_batch_size=2",
          "ppo_buffer_size=2", "ppo_epochs=1", "max_new_tokens=24", "temperature=0.8", "learning_rate=5e-4",
          "beta=0.15", "lora_rank=16", "lora_alpha=32", "lora_target=q_proj,k_proj,v_proj,o_proj", "seed=0",
          f"log_samples={PROMPTS * GROUP}", "log_samples_every=1", "judge_canaries=false"]
MODES = {"pointwise": {"score_format": "json"}, "listwise": {"judge_mode": "listwise"}}


def run_mode(mode: str, judge: LLMJudgeProcess, data: Path, out: Path, steps: int) -> dict:
    cfg = load_config(None, [
        "stage=ppo", f"model_name_or_path={convert_gguf(smollm2_gguf())}", "template=auto", "dataset=brief",
        f"dataset_dir={data}", "finetuning_type=lora", f"output_dir={out}", "report_to=none", "plot_loss=false",
        "save_steps=1000", "reward_model_type=api", f"reward_model={judge.url}", f"max_steps={steps}",
        "max_failure_rate=1.0", *RECIPE],
        reward_api={"preset": "openai_judge", "model": judge.name, "score_range": [0, 10], "timeout_s": 300,
                    "max_retries": 0, **MODES[mode]})
    run = ppo.run(cfg)
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    groups: dict[tuple, list] = defaultdict(list)
    for r in rows:
        groups[(r["step"], r["prompt"])].append(r)
    rhos = []
    for g in groups.values():
        ok = [(r["score"], real_task.brief_answer(r["prompt"], r["response"], None)) for r in g if r["score"] is not None]
        rho = spearman([a for a, _ in ok], [b for _, b in ok]) if len(ok) >= 3 else math.nan
        if not math.isnan(rho):
            rhos.append(rho)
    success = {s: mean(real_task.success(r["prompt"], r["response"]) for r in rows if r["step"] == s)
               for s in sorted({r["step"] for r in rows})}
    metrics = [m for m in read_metrics(run) if "reward/requests" in m]
    return {"requests_per_step": [m["reward/requests"] for m in metrics],
            "failed_per_step": [m.get("reward/failures", 0) for m in metrics],
            "group_spearman_vs_task": mean(rhos) if rhos else math.nan, "groups_ranked": len(rhos),
            "groups": len(groups), "success_first": success[min(success)], "success_last": success[max(success)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--llm", help="judge model directory or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--url", help="an OpenAI-compatible chat completions URL already serving (default: start vLLM)")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="listwise_grpo_"))
    data = real_task.write_dataset(tmp / "data")
    results = {}
    if args.url:
        judge = SimpleNamespace(url=args.url, name="judge")
        run_all(judge, data, tmp, args.steps, results)
    else:
        model = resolve_model_path(args.llm or str(smollm2_gguf()))
        with LLMJudgeProcess(model, log=tmp / "vllm.log", max_reply_tokens=48) as judge:
            run_all(judge, data, tmp, args.steps, results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


def run_all(judge, data: Path, tmp: Path, steps: int, results: dict) -> None:
    for mode in MODES:
        results[mode] = r = run_mode(mode, judge, data, tmp / mode, steps)
        print(f"{mode:10s} requests/step {r['requests_per_step']}  failed/step {r['failed_per_step']}  "
              f"group Spearman vs task {r['group_spearman_vs_task']:+.3f} ({r['groups_ranked']}/{r['groups']} "
              f"groups)  success {r['success_first']:.2f} -> {r['success_last']:.2f}", flush=True)


if __name__ == "__main__":
    main()
