"""Memory per rank of PPO under DDP, DeepSpeed ZeRO-3 and FSDP2, 2 CPU processes (prints figures).

    .venv/bin/python bench/sharded_memory.py [--repeats 3] [--hidden 768 --layers 8]   # 50.7M parameters

Each (backend, LoRA or full fine-tuning) runs ``alignkit.train.ppo`` (value head, rule reward, one step)
under ``accelerate launch`` with the shipped examples/accelerate config, ``--repeats`` times. Every
rank reports, in MiB:

- ``peak``: peak RSS of the process (``ru_maxrss``), whatever held it (the load, a rollout, imports);
- ``rss@prepared`` / ``rss@step1``: RSS right after the model is prepared (sharded) and right after
  the first PPO update (``/proc/self/status``);
- ``rss@start`` / ``rss@loaded``: RSS once the run is set up (imports, process group), and once the
  models are loaded (under ZeRO-3 through ``zero.Init``: already partitioned);
- ``trimmed@step1``: RSS after the first update once glibc has given freed heap back (``malloc_trim``),
  and its anonymous / file-backed / shared-memory parts (``Rss*@step1``, before the trim);
- ``state@prepared`` / ``state@step1``: the bytes of parameters, gradients and optimizer state this
  rank really holds: the storage under every parameter (its local shard: ``ds_tensor`` under ZeRO-3,
  the DTensor's local tensor under FSDP), every gradient, and every tensor of the optimizer's state
  and parameter groups (ZeRO's flat fp32 partitions), each storage counted once.

The bench prints the median over repeats of each figure (the larger rank's), and each backend's ratio
to DDP measured in the same invocation. Needs scripts/setup_deepspeed.sh for ZeRO-3.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
FIGURES = ("peak", "rss@start", "rss@loaded", "rss@prepared", "state@prepared", "rss@step1", "state@step1",
           "trimmed@step1", "RssAnon@step1", "RssFile@step1", "RssShmem@step1")


def rss_mib(kind: str = "VmRSS") -> float:
    """Current resident set size of this process (``kind``: VmRSS, or its RssAnon / RssFile / RssShmem part)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(kind + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def local_tensors(t) -> list:
    """The tensors whose storage this rank holds for ``t``: a DTensor's local shard, a ZeRO-3
    parameter's partition (``ds_tensor``) besides its (usually empty) data."""
    if t is None:
        return []
    if hasattr(t, "to_local"):
        return [t.to_local()]
    return [t.data if hasattr(t, "data") else t, *([t.ds_tensor] if hasattr(t, "ds_tensor") else [])]


def held_state_mib(model, optimizer) -> float:
    """Parameters + gradients + optimizer state resident on this rank, each storage counted once."""
    import torch

    tensors = []
    for p in model.parameters():
        tensors += local_tensors(p) + local_tensors(p.grad)
    opt = optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):  # accelerate/DeepSpeed wrappers
        opt = opt.optimizer
    for group in opt.param_groups:
        tensors += [x for p in group["params"] for x in local_tensors(p) + local_tensors(p.grad)]
    for state in opt.state.values():
        tensors += [x for v in state.values() if isinstance(v, torch.Tensor) for x in local_tensors(v)]
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        if storage.nbytes():
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values()) / MIB


def child(model: str, out: str, finetuning: str) -> None:
    """One rank of one PPO run, with the loop's ``prepare`` and first ``update`` wrapped to read memory."""
    import torch

    from alignkit.config import load_config
    from alignkit.train import ppo
    from alignkit.train.ppo import loop

    torch.set_num_threads(1)
    figures: dict[str, float] = {}
    prepare, update, setup_run, build_models = loop.prepare, loop.update, loop.setup_run, loop.build_models

    def set_up(*args, **kwargs):
        result = setup_run(*args, **kwargs)
        figures["rss@start"] = rss_mib()
        return result

    def built(*args, **kwargs):
        ac = build_models(*args, **kwargs)
        figures["rss@loaded"] = rss_mib()
        return ac

    def prepared(*args, **kwargs):
        r = prepare(*args, **kwargs)
        figures["rss@prepared"] = rss_mib()
        figures["state@prepared"] = held_state_mib(r.learner.model, r.learner.optimizer)
        return r

    def updated(learner, *args, **kwargs):
        stats = update(learner, *args, **kwargs)
        if "rss@step1" not in figures:
            figures["rss@step1"] = rss_mib()
            figures["state@step1"] = held_state_mib(learner.model, learner.optimizer)
            figures.update({f"{kind}@step1": rss_mib(kind) for kind in ("RssAnon", "RssFile", "RssShmem")})
            # glibc keeps freed heap memory (the rollout's gathered weights, the load's buffers) resident;
            # after malloc_trim what remains is what the process still uses.
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            figures["trimmed@step1"] = rss_mib()
        return stats

    loop.prepare, loop.update, loop.setup_run, loop.build_models = prepared, updated, set_up, built
    ppo.run(load_config(None, [
        "stage=ppo", f"model_name_or_path={model}", "template=chatml", f"finetuning_type={finetuning}",
        "lora_rank=8", "lora_target=q_proj,v_proj", f"output_dir={out}", "overwrite_output_dir=true", "max_steps=1",
        "report_to=none", "plot_loss=false", "per_device_train_batch_size=2", "gradient_accumulation_steps=1",
        f"dataset_dir={ROOT / 'examples' / 'data'}", "dataset=prompts_demo", "reward_model=count_good",
        "ppo_buffer_size=2", "ppo_epochs=1", "max_new_tokens=8", "save_steps=1000", "learning_rate=1e-5"]))
    figures["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (Path(out) / f"memory-rank{os.environ['RANK']}.json").write_text(json.dumps(figures))


def launch(config: str, model: Path, out: Path, finetuning: str) -> list[dict]:
    """One PPO run on 2 ranks; each rank's figures."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "examples" / "accelerate" / f"{config}.yaml"), "--num_processes", "2", "--mixed_precision",
           "no", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), str(Path(__file__).resolve()),
           "--child", "--model", str(model), "--out", str(out), "--finetuning", finetuning]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{config} {finetuning} failed:\n{proc.stderr[-4000:]}")
    return [json.loads(p.read_text()) for p in sorted(out.glob("memory-rank*.json"))]


def report(results: dict[tuple[str, str], list[list[dict]]], backends: list[str]) -> None:
    """Medians over repeats of each figure (the larger rank), and each backend's ratio to DDP."""
    for finetuning in ("lora", "full"):
        print(f"\n{finetuning}: median over {len(results[('ddp', finetuning)])} runs, max over the 2 ranks, MiB")
        print(f"{'':22s}" + "".join(f"{f:>15s}" for f in FIGURES))
        medians = {b: {f: statistics.median(max(r[f] for r in run) for run in results[(b, finetuning)])
                       for f in FIGURES} for b in backends}
        for b in backends:
            print(f"{b:22s}" + "".join(f"{medians[b][f]:15.1f}" for f in FIGURES))
        for b in backends[1:]:
            print(f"{b + ' / ddp':22s}" + "".join(f"{medians[b][f] / medians['ddp'][f]:14.2f}x" if medians["ddp"][f]
                                                  else f"{'-':>15s}" for f in FIGURES))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backends", default="ddp,deepspeed_zero3,fsdp", help="ddp first: the ratios' reference")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--model")
    ap.add_argument("--out")
    ap.add_argument("--finetuning", default="lora")
    args = ap.parse_args()
    if args.child:
        child(args.model, args.out, args.finetuning)
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    from alignkit.models.tiny import build_tiny

    backends = args.backends.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny(Path(tmp) / "model", hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                           num_layers=args.layers, num_heads=12, num_kv_heads=4, pretrain_steps=0)
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).parameters())
        print(f"model: {n / 1e6:.1f}M parameters, {n * 4 / MIB:.0f} MiB in fp32; PPO, 2 ranks, one step, fp32")
        results: dict[tuple[str, str], list[list[dict]]] = {}
        for _ in range(args.repeats):  # interleaved, so a slow moment of the machine hits every backend
            for finetuning in ("lora", "full"):
                for config in backends:
                    results.setdefault((config, finetuning), []).append(
                        launch(config, model, Path(tmp) / config, finetuning))
        report(results, backends)


if __name__ == "__main__":
    main()
