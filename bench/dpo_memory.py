"""Peak RSS of a LoRA DPO step vs a LoRA SFT step on the same ~50M-parameter model and batch (prints figures).

DPO's reference is the policy's own base with the LoRA adapter disabled, so it loads no second
model; its extra cost over SFT is the rejected answers' activations and one no-grad reference
pass (target: peak RSS <= 1.3x SFT's). For scale, the same DPO step with a separate reference
copy (``ref_model``) is measured too.

    .venv/bin/python bench/dpo_memory.py [--hidden 768 --layers 8 --batch 4]

Each run is its own process (peak RSS is per process), 2 optimizer steps. SFT trains on the
prompts and chosen answers of the very pairs DPO reads (prefs_demo), ``--batch`` rows per step.
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
RUNS = {
    "sft": ["stage=sft", "dataset=chosen"],
    "dpo": ["stage=dpo", "dataset=prefs_demo"],
    "dpo_ref_model": ["stage=dpo", "dataset=prefs_demo", "ref_model={model}"],
}


def chosen_as_sft(data_dir: Path) -> None:
    """prefs_demo's prompts with their chosen answers, as an SFT dataset named ``chosen``."""
    pairs = json.loads((ROOT / "examples" / "data" / "prefs_demo.json").read_text())
    rows = [{"instruction": p["instruction"], "output": p["chosen"]} for p in pairs]
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "chosen.json").write_text(json.dumps(rows))
    (data_dir / "prefs_demo.json").write_text(json.dumps(pairs))
    (data_dir / "dataset_info.json").write_text(json.dumps({
        "chosen": {"file_name": "chosen.json"},
        "prefs_demo": {"file_name": "prefs_demo.json", "ranking": True},
    }))


def child(run: str, model: str, data_dir: str, out: str, batch: int) -> None:
    import torch

    from alignkit.cli import STAGE_MODULES
    from alignkit.config import load_config

    torch.set_num_threads(1)
    keys = [k.format(model=model) for k in RUNS[run]] + [
        f"model_name_or_path={model}", "template=chatml", "finetuning_type=lora", "lora_rank=8",
        "lora_target=q_proj,v_proj", f"output_dir={out}", "overwrite_output_dir=true", "max_steps=2", "report_to=none",
        f"per_device_train_batch_size={batch}", f"dataset_dir={data_dir}", "cutoff_len=64", "save_steps=1000"]
    cfg = load_config(None, keys)
    __import__(STAGE_MODULES[cfg.stage], fromlist=["run"]).run(cfg)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure(run: str, model: Path, tmp: Path, batch: int) -> float:
    cmd = [sys.executable, __file__, "--child", run, "--model", str(model), "--data", str(tmp / "data"),
           "--out", str(tmp / run), "--batch", str(batch)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4, help="rows (SFT) or pairs (DPO) per step")
    ap.add_argument("--child", choices=list(RUNS))
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.model, args.data, args.out, args.batch)
        return
    from alignkit.models.tiny import build_tiny

    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        model = build_tiny(tmp / "model", hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                           num_layers=args.layers, num_heads=12, num_kv_heads=4, pretrain_steps=0)
        chosen_as_sft(tmp / "data")
        size = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 2**20
        print(f"model: hidden {args.hidden}, {args.layers} layers, {size:.0f} MB of fp32 weights; batch {args.batch}")
        peak = {run: measure(run, model, tmp, args.batch) for run in RUNS}
        for run, mb in peak.items():
            print(f"{run:>14}: peak RSS {mb:6.0f} MB  ({mb / peak['sft']:.2f}x SFT)")
        print(f"LoRA DPO / LoRA SFT peak RSS: {peak['dpo'] / peak['sft']:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
