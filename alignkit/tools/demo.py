"""``alignkit demo``: the whole pipeline on the tiny model, against a judge over real HTTP.

tiny model → SFT (LoRA) → judge server on 127.0.0.1 (the ``custom`` internal-evaluation
API shape) → PPO against it → export (merged, verified) → compare before/after → report.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import yaml

from alignkit import __file__ as _pkg_file
from alignkit.tools.demo_summary import print_summary, summarise

logger = logging.getLogger(__name__)
EXAMPLES = Path(_pkg_file).resolve().parents[1] / "examples"


def _examples() -> Path:
    if not (EXAMPLES / "data" / "dataset_info.json").is_file():
        raise FileNotFoundError(
            f"the demo needs the repository's examples/ directory (looked in {EXAMPLES}); "
            "run it from a source checkout installed with scripts/setup.sh"
        )
    return EXAMPLES


def judge_api_settings(url: str) -> dict:
    """The shipped ``custom`` preset (examples/judge_custom.yaml), pointed at the demo judge.

    The demo judge scores with ``fluent_answer``, a bounded 0..10 rubric (on topic, well formed,
    within a length budget of 8 words, none from 12, no repeated bigrams); scores are kept on that scale.
    """
    api = yaml.safe_load((_examples() / "judge_custom.yaml").read_text())["reward_api"]
    api.update(url=url + "/custom/evaluate", score_range=[0, 10], normalize=False, cache=None,
               max_failure_rate=0.2)
    api["headers"] = {"Authorization": "Bearer ${ALIGNKIT_DEMO_JUDGE_TOKEN}"}
    return api


# The demo's data (examples/data/make_data.py): the SFT answers are on topic, but nine in ten pad a fine
# first sentence with filler ("... I think it is very good, thank you."), past the judge's length
# budget; so the SFT model mostly rambles and PPO has a real behaviour to learn: stop after one sentence.
DEMO_SFT = ["dataset=sft_fluent", "num_train_epochs=6"]
# PPO on top of examples/ppo_tiny.yaml: 16 prompts a step in one mini-batch; scores normalised by their
# running mean/std, so the KL coefficient is in units of the score's spread; the adaptive controller
# holds the sequence KL near 0.4 nats (a few hundredths per token); the critic on its own adapter so
# the value loss does not pull the policy around; the learning rate warms up over the first quarter
# while the critic learns; samples every 5 steps; the judge's drift checked on fixed reference answers.
DEMO_PPO = ["dataset=prompts_fluent", "per_device_train_batch_size=16", "ppo_buffer_size=1", "learning_rate=1e-3",
            "lr_scheduler_type=constant_with_warmup", "warmup_ratio=0.25", "ppo_score_norm=true", "critic_adapter=true",
            "adap_kl_ctrl=true", "init_kl_coef=1.0", "ppo_target=0.4", "kl_horizon=1000", "log_samples_every=5",
            "reward_probe_every=10"]


def run_demo(output: Path, steps: int = 120, keep_server: bool = False) -> dict:
    import os
    import secrets

    import torch

    from alignkit.config import load_config
    from alignkit.export import ExportConfig, export_model
    from alignkit.judge.process import JudgeProcess
    from alignkit.models.tiny import build_tiny
    from alignkit.tools.compare import CompareConfig, run_compare
    from alignkit.train import ppo, sft

    examples = _examples()
    output.mkdir(parents=True, exist_ok=True)
    # One intra-op thread: the tiny model gains little from more, and on a small shared machine
    # spinning OpenMP threads competing with the judge process made steps many times slower.
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    common = [f"dataset_dir={examples / 'data'}", "overwrite_output_dir=true"]

    print("[1/6] tiny model (Qwen2 architecture, BPE tokenizer trained on shipped text)")
    tiny = build_tiny(output / "tiny")

    print("[2/6] SFT (LoRA) on examples/data/sft_fluent.json")
    sft_dir = sft.run(load_config(examples / "sft_tiny.yaml", [
        f"model_name_or_path={tiny}", f"output_dir={output / 'sft'}", *DEMO_SFT, *common]))

    # A bearer token the judge requires; the client reads it from the environment, so it is
    # never written to a config, a log or a checkpoint.
    # The server reads its copy from ALIGNKIT_JUDGE_TOKEN (not argv, which `ps` shows).
    token = secrets.token_hex(16)
    os.environ["ALIGNKIT_DEMO_JUDGE_TOKEN"] = token
    judge = JudgeProcess(rule="fluent_answer", log=output / "judge.log", env={"ALIGNKIT_JUDGE_TOKEN": token}).start()
    print(f"[3/6] judge server on {judge.url} (custom evaluation-API shape, bearer token)")
    try:
        print(f"[4/6] PPO against the judge over HTTP, {steps} steps")
        ppo_cfg = load_config(examples / "ppo_tiny.yaml", [
            f"model_name_or_path={tiny}", f"adapter_name_or_path={sft_dir}", f"output_dir={output / 'ppo'}",
            f"max_steps={steps}", "reward_model_type=api", f"reward_probe={examples / 'data' / 'probe_demo.jsonl'}",
            # The demo's rule judge (fluent_answer) gives the prompt echoed back 10 and "Let me solve this
            # step by step." 5, above the policy's median: the judge_canaries check fails it (issue 24).
            "judge_canaries=false",
            *DEMO_PPO, *common],
            reward_model=judge.url + "/custom/evaluate", reward_api=judge_api_settings(judge.url))
        ppo_dir = ppo.run(ppo_cfg)

        print("[5/6] export: merge SFT + PPO adapters into a plain model, verify it reloads")
        export_dir = output / "exported"
        report = export_model(ExportConfig(run_dir=str(ppo_dir), export_dir=str(export_dir)))

        print("[6/6] compare before (SFT) vs after (exported PPO model), scored by the judge")
        cmp = run_compare(CompareConfig(
            model_a={"model_name_or_path": str(sft_dir), "name": "SFT"},
            model_b={"model_name_or_path": str(export_dir), "name": "PPO"},
            dataset="prompts_fluent", dataset_dir=str(examples / "data"), max_samples=32, max_new_tokens=32,
            reward_model_type="api", reward_model=judge.url + "/custom/evaluate",
            reward_api=judge_api_settings(judge.url), output_dir=str(output / "compare")))
    finally:
        if keep_server:
            print(f"judge server left running on {judge.url} (pid {judge.proc.pid})")
        else:
            judge.stop()

    outputs = {"tiny_model": str(tiny), "sft_adapter": str(sft_dir), "ppo_run": str(ppo_dir),
               "exported_model": str(export_dir), "compare": str(output / "compare"),
               "judge_log": str(output / "judge.log")}
    summary = {**summarise(ppo_dir, report, cmp, outputs), "seconds": round(time.perf_counter() - t0, 1)}
    (output / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on a tiny model against a local judge (minutes, CPU)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="outputs/demo", help="directory for every output (default outputs/demo)")
    p.add_argument("--steps", type=int, default=None, help="PPO steps (default 120; 10 with --real)")
    p.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct instead of the tiny model "
                   "(scripts/setup.sh --real; ~10 min on 2 cores): alignkit/tools/demo_real.py")
    p.add_argument("--keep-server", action="store_true", help="leave the judge server running at the end")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    if args.real:
        from alignkit.tools.demo_real import run_real_demo

        out = Path(args.output if args.output != "outputs/demo" else "outputs/demo_real")
        print_summary(run_real_demo(out, args.steps or 10), before="base")
        return 0
    print_summary(run_demo(Path(args.output), args.steps or 120, args.keep_server))
    return 0
