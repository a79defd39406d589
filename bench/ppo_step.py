"""Seconds per PPO step on the reference configuration (prints figures; not a test).

Reference: tiny Qwen2 (hidden 128, intermediate 256, 4 layers, 4 heads, 2 KV heads, vocab 512,
tied embeddings), LoRA r 8 / alpha 16 on q_proj,v_proj, rollout batch 16, mini-batch 4,
ppo_epochs 4, max_new_tokens 32, top_k 0 / top_p 1.0, reward = count of the word "good".

    .venv/bin/python bench/ppo_step.py [--steps 10] [--warmup 2] [--threads 1] [--judge-ms 0]

With ``--judge-ms N`` the reward comes from the judge server over HTTP with N ms latency
(``count_good`` on the server), to measure how much latency the overlap hides.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from alignkit.config import load_config
from alignkit.models.tiny import build_tiny
from alignkit.train import ppo
from alignkit.train.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def reference_config(model: Path, out: Path, steps: int, judge_url: str | None, **extra) -> object:
    args = {
        "stage": "ppo", "model_name_or_path": str(model), "dataset": "prompts_demo",
        "dataset_dir": str(ROOT / "examples" / "data"), "template": "chatml", "finetuning_type": "lora",
        "lora_rank": 8, "lora_alpha": 16, "lora_target": "q_proj,v_proj", "output_dir": str(out),
        "overwrite_output_dir": True, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
        "ppo_buffer_size": 4, "ppo_epochs": 4, "max_new_tokens": 32, "top_k": 0, "top_p": 1.0,
        "max_steps": steps, "save_steps": 10_000, "report_to": "none", "learning_rate": 1e-5,
        "reward_model_type": "rule", "reward_model": "count_good",
    }
    if judge_url:
        args.update(reward_model_type="api", reward_model=judge_url)
    args.update(extra)
    return load_config(None, [f"{k}={v}" for k, v in args.items()])


def run_once(model: Path, steps: int, warmup: int, judge_url: str | None = None, **extra) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = ppo.run(reference_config(model, Path(tmp) / "run", steps + warmup, judge_url, **extra))
        rows = read_metrics(out)[warmup:]
    med = {k: statistics.median(r[k] for r in rows) for k in
           ("time/step", "time/rollout", "time/generate", "time/score_wait", "time/update", "perf/tokens_per_s",
            "perf/peak_rss_mb")}
    return med


def report(name: str, m: dict[str, float]) -> None:
    print(f"{name}: {m['time/step']:.3f} s/step (median) | rollout {m['time/rollout']:.3f} s "
          f"(generate {m['time/generate']:.3f}) | score wait {m['time/score_wait']:.3f} s | "
          f"update {m['time/update']:.3f} s | {m['perf/tokens_per_s']:.0f} response tokens/s | "
          f"peak RSS {m['perf/peak_rss_mb']:.0f} MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--judge-ms", type=float, default=None, help="also run against a judge with this latency")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny(Path(tmp) / "tiny", hidden_size=128, intermediate_size=256, num_layers=4,
                           num_heads=4, num_kv_heads=2, vocab_size=512)
        print(f"torch {torch.__version__}, {args.threads} thread(s); {args.steps} steps after {args.warmup} warm-up")
        rule = run_once(model, args.steps, args.warmup)
        report("rule reward (count_good)", rule)
        if args.judge_ms is not None:
            from alignkit.judge.process import JudgeProcess

            results = {}
            for ms in (0.0, args.judge_ms):
                with JudgeProcess(rule="count_good", latency_ms=ms) as judge:
                    results[ms] = run_once(model, args.steps, args.warmup, judge.url + "/score")
                report(f"judge over HTTP, {ms:g} ms latency", results[ms])
            ratio = results[args.judge_ms]["time/step"] / results[0.0]["time/step"]
            print(f"ratio s/step {args.judge_ms:g} ms judge / 0 ms judge: {ratio:.3f} (target <= 1.10)")
        print(f"target <= 0.55 s/step; measured {rule['time/step']:.3f} s/step")


if __name__ == "__main__":
    main()
