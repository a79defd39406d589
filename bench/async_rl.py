"""Synchronous (async_level 0) against asynchronous (1, 2) GRPO behind a slow judge, one run; prints figures.

Model: the reference tiny Qwen2 of ``bench/ppo_step.py`` (~0.65 M parameters), LoRA r 8 on
q_proj,v_proj; GRPO 4 prompts x 4 generations, ppo_epochs 1, max_new_tokens 32. Reward: the
project's judge server on 127.0.0.1 (rule count_good) over HTTP, one request per sample, with
``--latencies`` seconds added to every request, at most ``--concurrency`` requests in flight,
no cache (every step pays its judge calls).

    .venv/bin/python bench/async_rl.py [--latencies 0,1,3] [--levels 0,1,2] [--steps 8] [--warmup 3]
                                       [--worker none|process|both] [--engine hf|vllm_server]

``--worker process`` runs the async levels with the hf engine in a rollout worker process
(``rollout.worker: process``: rollout overlaps the update), ``both`` prints in-process and worker
side by side; sync stays in-process. ``--engine vllm_server`` samples every level from one vLLM
OpenAI server (.venv-vllm) started once by alignkit's launcher, as a run would start it, and
stopped at the end (``rollout.urls``: each run pushes its own LoRA versions to it).

For each latency it prints each level's s/step over ``--steps`` steps after ``--warmup`` (the
mean: a pipeline's steps alternate between waiting for the judge and finding scores ready, so its
cost is wall time over steps; the median step is printed beside it), its ratio to sync's, and the
pipelined bound: with k + 1 batches in flight a step costs about sync's step / (k + 1), but never
less than the compute of one step (sync's rollout + update, no judge wait), so
``bound = max(compute, sync / (k + 1))``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from ppo_step import build_reference_model, reference_config

from alignkit.judge.server import start_judge_server
from alignkit.train import ppo
from alignkit.train.tracking import read_metrics

GRPO = dict(advantage_estimator="grpo", num_generations=4, beta=0, per_device_train_batch_size=4,
            ppo_buffer_size=1, ppo_epochs=1)


def run_level(model: Path, url: str, level: int, steps: int, warmup: int, concurrency: int,
              rollout: dict[str, str], bf16: bool = False) -> dict[str, float]:
    """Median per-step figures of one run at ``async_level: level`` with the ``rollout`` engine keys."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = reference_config(model, Path(tmp) / "run", steps + warmup, url, **GRPO, async_level=level, bf16=bf16,
                               **{"reward_api.health_check": False, "reward_api.cache": "null",
                                  "reward_api.max_concurrency": concurrency, "reward_api.max_retries": 0},
                               **{f"rollout.{k}": v for k, v in rollout.items()})
        rows = read_metrics(ppo.run(cfg))[warmup:]
    keys = ("time/step", "time/rollout", "time/update", "time/score_wait", "async/learner_wait_s",
            "env/reward_mean", "is/ratio_mean")
    out = {k: statistics.median(r[k] for r in rows) for k in keys if all(k in r for r in rows)}
    # A pipeline's steps alternate (one waits for the judge, the next finds its scores ready), so its
    # cost is the mean step (the run's wall time over its steps), not the median.
    out["time/step_mean"] = statistics.fmean(r["time/step"] for r in rows)
    return out


@contextlib.contextmanager
def vllm_server(model: Path, work: Path, dtype: str = "float32", gpu_memory_utilization: float | None = None
                ) -> Iterator[str]:
    """One vLLM OpenAI server on ``model`` with alignkit's server arguments (LoRA on); its URL."""
    from torch import nn

    from alignkit.generation import EngineContext, engine_settings
    from alignkit.generation.server_engine import server_args
    from alignkit.generation.server_process import ServerProcess, vllm_python

    block = {"engine": "vllm_server"}
    if gpu_memory_utilization is not None:  # a GPU shared with the trainer
        block["gpu_memory_utilization"] = gpu_memory_utilization
    settings = engine_settings(block)
    # No peft model here: the LoRA rank slot defaults to the one for rank 8 (the bench's lora_rank).
    args = server_args(settings, nn.Module(), EngineContext(str(model), 0, dtype, 512, 0))
    proc = ServerProcess(vllm_python(settings.python), model, args, work / "server.log")
    try:
        proc.wait_healthy(settings.startup_timeout_s)
        yield proc.url
    finally:
        proc.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latencies", default="0,1,3", help="seconds added to every judge request, comma list")
    ap.add_argument("--levels", default="0,1,2", help="async_level values; 0 (sync) is the baseline")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=64, help="judge requests in flight at most")
    ap.add_argument("--worker", choices=("none", "process", "both"), default="none",
                    help="hf engine for the async levels: in-process, in a rollout worker process, or both")
    ap.add_argument("--engine", choices=("hf", "vllm", "vllm_server"), default="hf",
                    help="rollout engine of every level (vllm: colocated, run the bench with the vLLM env's python)")
    ap.add_argument("--model", type=Path, help="model directory (default: the reference tiny model, built here)")
    ap.add_argument("--bf16", action="store_true", help="train in bf16 and serve in bfloat16 (a GPU)")
    ap.add_argument("--gpu-memory-utilization", type=float, help="the bench's vLLM server's share of the GPU")
    args = ap.parse_args()
    engine: dict[str, str] = {"engine": args.engine}
    variants = [("", engine)] if args.engine != "hf" or args.worker == "none" else \
        [("", engine)] * (args.worker == "both") + [(" worker", {**engine, "worker": "process"})]
    levels = sorted({0, *(int(x) for x in args.levels.split(","))})
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread; GRPO 4x4, 32 new tokens; {args.steps} steps after {args.warmup} "
          f"warm-up; judge concurrency {args.concurrency}; rollout engine {args.engine}")
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        model = args.model or build_reference_model(Path(tmp))
        if args.engine == "vllm_server":
            server = vllm_server(model, Path(tmp), "bfloat16" if args.bf16 else "float32", args.gpu_memory_utilization)
            engine["urls"] = f"[{stack.enter_context(server)}]"
        for latency in (float(x) for x in args.latencies.split(",")):
            with start_judge_server(rule="count_good", latency_ms=latency * 1000) as judge:
                url = judge.url_for("alignkit")
                sync = run_level(model, url, 0, args.steps, args.warmup, args.concurrency, engine, args.bf16)
                compute = sync["time/rollout"] + sync["time/update"]
                base = sync["time/step_mean"]
                print(f"judge +{latency:g} s: sync {base:.3f} s/step (median {sync['time/step']:.3f}; rollout "
                      f"{sync['time/rollout']:.3f}, "
                      f"score wait {sync['time/score_wait']:.3f}, update {sync['time/update']:.3f}; compute "
                      f"{compute:.3f})")
                for k, (name, rollout) in ((k, v) for k in levels[1:] for v in variants):
                    m = run_level(model, url, k, args.steps, args.warmup, args.concurrency, rollout, args.bf16)
                    step = m["time/step_mean"]
                    bound = max(compute, base / (k + 1))
                    print(f"  async_level {k}{name}: {step:.3f} s/step = {step / base:.2f}x sync (median step "
                          f"{m['time/step']:.3f}) | pipelined bound {bound:.3f} s ({bound / base:.2f}x), "
                          f"{step / bound:.2f}x the bound | learner wait "
                          f"{m.get('async/learner_wait_s', float('nan')):.3f} s | IS ratio mean "
                          f"{m.get('is/ratio_mean', float('nan')):.4f}")


if __name__ == "__main__":
    main()
