"""Peak RSS of a PPO step vs an SFT step on the same model, dense or MoE (prints figures).

PPO holds one base model: the policy is a LoRA adapter, the critic a value head on the
policy's hidden states, the reference the same weights with the adapter disabled. So its
peak memory should stay close to LoRA SFT's (target <= 1.3x), unlike trainers that load
policy, reference, critic and reward model as four copies. The floor is a process that only
loads the model: what a step adds on top of the weights is the part a trainer controls.

    .venv/bin/python bench/ppo_memory.py [--hidden 768 --layers 8]
    .venv/bin/python bench/ppo_memory.py --arch qwen3_moe --lora-target all   # MoE: experts adapted too

Each stage runs in its own process (peak RSS is per process), 2 steps, same batch of 4;
figures are medians over --repeats processes.
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
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("load", "sft", "ppo")


def child(stage: str, model: str, out: str, lora_target: str) -> None:
    import torch

    from alignkit.config import load_config
    from alignkit.models.loading import load_causal_lm
    from alignkit.train import ppo, sft

    torch.set_num_threads(1)
    common = [f"model_name_or_path={model}", "template=chatml", "finetuning_type=lora", "lora_rank=8",
              f"lora_target={lora_target}", f"output_dir={out}", "overwrite_output_dir=true", "max_steps=2",
              "report_to=none", "per_device_train_batch_size=4", "gradient_accumulation_steps=1",
              f"dataset_dir={ROOT / 'examples' / 'data'}", "save_steps=1000"]
    if stage == "load":
        load_causal_lm(model, torch.float32, False)
    elif stage == "sft":
        sft.run(load_config(None, ["stage=sft", "dataset=sft_demo", "cutoff_len=64", *common]))
    else:
        ppo.run(load_config(None, ["stage=ppo", "dataset=prompts_demo", "reward_model=count_good",
                                   "ppo_buffer_size=4", "ppo_epochs=1", "max_new_tokens=32", *common]))
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def peak_rss(stage: str, model: Path, out: Path, lora_target: str) -> float:
    res = subprocess.run([sys.executable, __file__, "--child", stage, "--model", str(model), "--out", str(out),
                          "--lora-target", lora_target], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="qwen2", help="tiny model family (alignkit tiny --arch), e.g. qwen3_moe")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--lora-target", default="q_proj,v_proj")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", choices=STAGES)
    ap.add_argument("--model")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.model, args.out, args.lora_target)
        return
    from alignkit.models.tiny import build_tiny

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny(Path(tmp) / "model", arch=args.arch, hidden_size=args.hidden,
                           intermediate_size=args.hidden * 8 // 3, num_layers=args.layers, num_heads=12,
                           num_kv_heads=4, pretrain_steps=0)
        weights_mb = sum(os.path.getsize(p) for p in model.glob("*.safetensors")) / 2**20
        print(f"model: {args.arch}, hidden {args.hidden}, {args.layers} layers, ~{weights_mb / 4 * 1.048576:.0f}M "
              f"parameters ({weights_mb:.0f} MiB fp32); lora_target {args.lora_target}")
        rss = {}
        for stage in STAGES:
            runs = [peak_rss(stage, model, Path(tmp) / f"{stage}{i}", args.lora_target) for i in range(args.repeats)]
            rss[stage] = median(runs)
            print(f"{stage}: peak RSS {rss[stage]:.0f} MiB (median of {len(runs)}: {', '.join(f'{r:.0f}' for r in runs)})")
        for stage in ("sft", "ppo"):
            print(f"{stage} above the load-only floor: {rss[stage] - rss['load']:.0f} MiB "
                  f"({(rss[stage] - rss['load']) / weights_mb:.2f}x the weights)")
        print(f"PPO / SFT peak RSS: {rss['ppo'] / rss['sft']:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
