"""Peak RSS per rank of PPO steps under DDP vs DeepSpeed ZeRO-3, 2 CPU processes (prints figures).

    .venv/bin/python bench/sharded_memory.py [--hidden 768 --layers 8]   # ~56M parameters

Each backend runs ``alignkit.train.ppo`` (LoRA, value head, rule reward, 2 steps) under
``accelerate launch`` with the shipped examples/accelerate config; every rank prints its own peak
RSS (``ru_maxrss``) and the bench prints them with the model's fp32 size. ZeRO-3 partitions the
weights (zero3_init_flag: at load), but a PPO step still gathers the whole policy once per rollout
(sharding.rollout_context), so its *peak* holds the full weights for the rollout's duration; the
table says how far below DDP it stays. Needs scripts/setup_deepspeed.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(model: str, out: str) -> None:
    import torch

    from alignkit.config import load_config
    from alignkit.train import ppo

    torch.set_num_threads(1)
    ppo.run(load_config(None, [
        "stage=ppo", f"model_name_or_path={model}", "template=chatml", "finetuning_type=lora", "lora_rank=8",
        "lora_target=q_proj,v_proj", f"output_dir={out}", "overwrite_output_dir=true", "max_steps=2",
        "report_to=none", "plot_loss=false", "per_device_train_batch_size=2", "gradient_accumulation_steps=1",
        f"dataset_dir={ROOT / 'examples' / 'data'}", "dataset=prompts_demo", "reward_model=count_good",
        "ppo_buffer_size=2", "ppo_epochs=1", "max_new_tokens=16", "save_steps=1000"]))
    print("RSS " + json.dumps({"rank": int(os.environ["RANK"]),
                               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def launch(config: str, model: Path, out: Path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "examples" / "accelerate" / f"{config}.yaml"), "--num_processes", "2", "--mixed_precision",
           "no", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), str(Path(__file__).resolve()),
           "--child", "--model", str(model), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{config} failed:\n{proc.stderr[-4000:]}")
    rows = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("RSS ")]
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--model")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        child(args.model, args.out)
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    from alignkit.models.tiny import build_tiny

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny(Path(tmp) / "model", hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                           num_layers=args.layers, num_heads=12, num_kv_heads=4, pretrain_steps=0)
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).parameters())
        print(f"model: {n / 1e6:.1f}M parameters, {n * 4 / 2**20:.0f} MiB in fp32; PPO, 2 ranks, 2 steps")
        peaks = {}
        for config in ("ddp", "deepspeed_zero3"):
            rows = launch(config, model, Path(tmp) / config)
            peaks[config] = max(r["peak_rss_mb"] for r in rows)
            print(f"{config:16s} " + "  ".join(f"rank {r['rank']}: {r['peak_rss_mb']:7.0f} MiB" for r in rows))
        print(f"ZeRO-3 peak per rank vs DDP: {peaks['deepspeed_zero3'] / peaks['ddp']:.2f}x "
              f"({peaks['deepspeed_zero3'] - peaks['ddp']:+.0f} MiB; half the fp32 weights is {n * 2 / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
