"""Peak RSS of a PPO step vs an SFT step on the same ~50M-parameter model (prints figures).

PPO holds one base model: the policy is a LoRA adapter, the critic a value head on the
policy's hidden states, the reference the same weights with the adapter disabled. So its
peak memory should stay close to LoRA SFT's (target <= 1.3x), unlike trainers that load
policy, reference, critic and reward model as four copies.

    .venv/bin/python bench/ppo_memory.py [--hidden 768 --layers 8]

Each stage runs in its own process (peak RSS is per process), 2 steps, same batch of 4.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(stage: str, model: str, out: str) -> None:
    import torch

    from alignkit.config import load_config
    from alignkit.train import ppo, sft

    torch.set_num_threads(1)
    common = [f"model_name_or_path={model}", "template=chatml", "finetuning_type=lora", "lora_rank=8",
              "lora_target=q_proj,v_proj", f"output_dir={out}", "overwrite_output_dir=true", "max_steps=2",
              "report_to=none", "per_device_train_batch_size=4", "gradient_accumulation_steps=1",
              f"dataset_dir={ROOT / 'examples' / 'data'}", "save_steps=1000"]
    if stage == "sft":
        sft.run(load_config(None, ["stage=sft", "dataset=sft_demo", "cutoff_len=64", *common]))
    else:
        ppo.run(load_config(None, ["stage=ppo", "dataset=prompts_demo", "reward_model=count_good",
                                   "ppo_buffer_size=4", "ppo_epochs=1", "max_new_tokens=32", *common]))
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--child", choices=["sft", "ppo"])
    ap.add_argument("--model")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.model, args.out)
        return
    from alignkit.models.tiny import build_tiny

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny(Path(tmp) / "model", hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                           num_layers=args.layers, num_heads=12, num_kv_heads=4, pretrain_steps=0)
        n_params = sum(os.path.getsize(p) for p in model.glob("*.safetensors")) / 4 / 1e6
        print(f"model: hidden {args.hidden}, {args.layers} layers, ~{n_params:.0f}M parameters (fp32)")
        rss = {}
        for stage in ("sft", "ppo"):
            res = subprocess.run([sys.executable, __file__, "--child", stage, "--model", str(model),
                                  "--out", str(Path(tmp) / stage)], capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
            rss[stage] = json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mb"]
            print(f"{stage}: peak RSS {rss[stage]:.0f} MB")
        print(f"PPO / SFT peak RSS: {rss['ppo'] / rss['sft']:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
