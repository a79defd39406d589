"""PPO (gae, with a critic) and GRPO (critic-free) on the same rollout size, one run; prints figures.

Model: the reference tiny Qwen2 of ``bench/ppo_step.py`` (hidden 128, 4 layers, vocab 512,
~0.65 M parameters), LoRA r 8 on q_proj,v_proj, reward = count of the word "good",
max_new_tokens 32, 16 responses a step:

- GRPO: 4 prompts x 4 generations, beta 0 (no reference pass), ppo_epochs 1, one optimizer step
  per batch: the configuration TRL's GRPOTrainer was timed on (about 0.27 s/step on this kind
  of machine, measured by the issue's author, not here).
- PPO matched: 16 prompts x 1, ppo_epochs 1, one optimizer step per batch (same work shape).
- PPO reference: 16 prompts, ppo_epochs 4 x 4 mini-batches (bench/ppo_step.py's configuration).

    .venv/bin/python bench/critic_free.py [--steps 10] [--warmup 2] [--repeats 5]

Each figure is the median s/step over ``--steps`` steps after ``--warmup``; the compute floor
(bare decode + forwards + forward/backward on the same shapes, responses as long as the run's
median longest one) is timed in the same process.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from ppo_step import build_reference_model, compute_floor, run_once

TRL_GRPO_S_PER_STEP = 0.27  # the figure for TRL 1.16 GRPOTrainer on this configuration (not measured here)

CONFIGS = {
    "GRPO 4x4, beta 0, 1 step/batch": dict(advantage_estimator="grpo", num_generations=4, beta=0,
                                           per_device_train_batch_size=4, ppo_buffer_size=1, ppo_epochs=1),
    "PPO 16x1, 1 step/batch": dict(per_device_train_batch_size=16, ppo_buffer_size=1, ppo_epochs=1),
    "PPO 16x1, 4 epochs x 4 mini-batches": {},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="runs of each compute-floor part (median)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_reference_model(Path(tmp))
        print(f"torch {torch.__version__}, 1 thread; {args.steps} steps after {args.warmup} warm-up; 16 responses/step")
        for name, extra in CONFIGS.items():
            m = run_once(model, args.steps, args.warmup, **extra)
            floor = compute_floor(model, args.repeats, round(m["rollout/response_len_max"]), **extra)
            print(f"{name}: {m['time/step']:.3f} s/step | generate {m['time/generate']:.3f} s | update "
                  f"{m['time/update']:.3f} s | {m['perf/tokens_per_s']:.0f} response tokens/s | peak RSS "
                  f"{m['perf/peak_rss_mb']:.0f} MB | floor {floor['total']:.3f} s (decode {floor['decode']:.3f}, "
                  f"forwards {floor['no-grad forwards']:.3f}, fwd/bwd {floor['forward/backward']:.3f}) | "
                  f"ratio to floor {m['time/step'] / floor['total']:.2f}")
            if name.startswith("GRPO"):
                print(f"  vs TRL GRPOTrainer's {TRL_GRPO_S_PER_STEP} s/step (issue figure): "
                      f"{m['time/step'] / TRL_GRPO_S_PER_STEP:.2f}x (target <= 0.8x)")


if __name__ == "__main__":
    main()
