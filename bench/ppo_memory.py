"""Peak RSS of a PPO step vs an SFT step on the same model, dense or MoE; on the real model, of a GRPO
step with the chunked log-probs vs the row-by-row ones they replaced (prints figures).

PPO holds one base model: the policy is a LoRA adapter, the critic a value head on the
policy's hidden states, the reference the same weights with the adapter disabled. So its
peak memory should stay close to LoRA SFT's (target <= 1.3x), unlike trainers that load
policy, reference, critic and reward model as four copies. The floor is a process that only
loads the model: what a step adds on top of the weights is the part a trainer controls.

    .venv/bin/python bench/ppo_memory.py [--hidden 768 --layers 8]
    .venv/bin/python bench/ppo_memory.py --arch qwen3_moe --lora-target all   # MoE: experts adapted too

    .venv/bin/python bench/ppo_memory.py --model smollm2 --repeats 1   # SmolLM2-135M (49k vocab), GRPO

Each stage runs in its own process (peak RSS is per process), 2 steps, same batch of 4;
figures are medians over --repeats processes.

``--model smollm2`` (scripts/setup.sh --real) runs the GRPO step of issue 23 (4 prompts x 4, 32 new
tokens, LoRA r16 on q,k,v,o) four times: ``grpo_rowwise`` with the previous log-probs (one float32
log_softmax row at a time, every row kept by autograd), ``grpo`` with alignkit's (chunked: nothing
of size (B, T, V) but the logits and their gradient), ``grpo_checkpointed`` with
``gradient_checkpointing: true`` as well (the layers' activations, not the vocabulary, are then what
is left) and ``grpo_micro``, checkpointed and in micro-batches of one group (4 rows; gradient
accumulation keeps the optimizer step the same). Every stage runs with the fixed glibc mmap threshold
that training sets (``alignkit.train.heap``) but ``grpo_micro_dynamic``: ``grpo_micro`` with
``ALIGNKIT_MALLOC_MMAP_THRESHOLD=off``, glibc's dynamic threshold, as before. It prints each stage's
CPU seconds (user + system) with its peak, and each against a floor: the load-only
process (every weight touched) + the LoRA state (weights, grads, 2 Adam moments) + one chunk, and
against the weights, also above the ``bare`` process (the trainer's imports, no model: ~370 MiB of
the peak that no trainer setting can lower).
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
REAL_STAGES = ("bare", "load", "grpo_rowwise", "grpo", "grpo_checkpointed", "grpo_micro_dynamic", "grpo_micro")
LOGIT_STAGES = ("torch_only", "logprobs_rowwise", "logprobs")  # the update's log-prob math alone


def rowwise_logprobs(logits, tokens, temperature: float = 1.0):
    """The log-probs before the chunked version: a float32 row at a time, each kept for backward."""
    import torch

    dtype = torch.promote_types(logits.dtype, torch.float32)
    selected = torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1).to(dtype) / temperature
    return selected - torch.stack([torch.logsumexp(row.to(dtype) / temperature, dim=-1) for row in logits])


def rowwise_entropy(logits, temperature: float = 1.0):
    import torch

    dtype = torch.promote_types(logits.dtype, torch.float32)
    out = []
    for row in logits:
        logp = torch.log_softmax(row.to(dtype) / temperature, dim=-1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.stack(out)


def logprob_math(stage: str, vocab: int) -> None:
    """One update micro-batch's log-prob math on its own: (16, 33, V) logits -> log-probs, entropy
    (no grad, as logged) and the backward pass to the logits; ``torch_only`` allocates nothing."""
    import torch

    from alignkit.algos import entropy_from_logits, logprobs_from_logits

    if stage == "torch_only":
        return
    lp, ent = (rowwise_logprobs, rowwise_entropy) if stage == "logprobs_rowwise" else (logprobs_from_logits,
                                                                                      entropy_from_logits)
    torch.manual_seed(0)
    logits = torch.randn(16, 33, vocab, requires_grad=True)
    tokens = torch.randint(0, vocab, (16, 33))
    logp = lp(logits, tokens, 0.8)
    ent(logits.detach(), 0.8)
    logp.sum().backward()


def grpo_overrides(lora_target: str) -> list[str]:
    """Issue 23's GRPO step on SmolLM2: 4 prompts x 4 responses, 32 new tokens, LoRA r16."""
    return ["stage=ppo", "dataset=prompts_demo", "reward_model=count_good", "advantage_estimator=grpo",
            "num_generations=4", "per_device_train_batch_size=4", "ppo_buffer_size=1", "ppo_epochs=1",
            "max_new_tokens=32", "beta=0.02", "template=auto", "lora_rank=16", f"lora_target={lora_target}"]


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
    if stage in LOGIT_STAGES:
        logprob_math(stage, json.loads((Path(model) / "config.json").read_text())["vocab_size"])
    elif stage == "bare":  # what the trainer's imports cost before any model is loaded
        import alignkit.train.ppo.loop  # noqa: F401
    elif stage == "load":
        lm = load_causal_lm(model, torch.float32, False)
        sum(float(p.sum()) for p in lm.parameters())  # every weight resident, as after a forward pass
    elif stage.startswith("grpo"):
        if stage == "grpo_rowwise":  # the loop's own names, as it imported them
            import alignkit.train.ppo.experience as experience
            import alignkit.train.ppo.update as update

            experience.logprobs_from_logits = update.logprobs_from_logits = rowwise_logprobs
            update.entropy_from_logits = rowwise_entropy
        micro_stage = stage.startswith("grpo_micro")
        checkpointed = [f"gradient_checkpointing={stage == 'grpo_checkpointed' or micro_stage}"]
        # grpo_micro: the same 16 rows a step and the same optimizer step, in micro-batches of one
        # group (4 rows: gradient accumulation) and no-grad passes of 4 rows (old/ref log-probs).
        micro = ["per_device_train_batch_size=1", "gradient_accumulation_steps=4",
                 "per_device_eval_batch_size=4"] if micro_stage else []
        ppo.run(load_config(None, [*common, *grpo_overrides(lora_target), *checkpointed, *micro]))
    elif stage == "sft":
        sft.run(load_config(None, ["stage=sft", "dataset=sft_demo", "cutoff_len=64", *common]))
    else:
        ppo.run(load_config(None, ["stage=ppo", "dataset=prompts_demo", "reward_model=count_good",
                                   "ppo_buffer_size=4", "ppo_epochs=1", "max_new_tokens=32", *common]))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"peak_rss_mb": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime}))


def child_run(stage: str, model: Path, out: Path, lora_target: str) -> dict[str, float]:
    """The stage in its own process: its peak RSS (MiB) and CPU seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if stage == "grpo_micro_dynamic":
        env["ALIGNKIT_MALLOC_MMAP_THRESHOLD"] = "off"
    res = subprocess.run([sys.executable, __file__, "--child", stage, "--child-model", str(model), "--out", str(out),
                          "--lora-target", lora_target], capture_output=True, text=True, env=env, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def peak_rss(stage: str, model: Path, out: Path, lora_target: str) -> float:
    return child_run(stage, model, out, lora_target)["peak_rss_mb"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="qwen2", help="tiny model family (alignkit tiny --arch), e.g. qwen3_moe")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--lora-target", default="q_proj,v_proj")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", dest="real", help="smollm2 (or a model directory): the real-vocabulary GRPO comparison")
    ap.add_argument("--child", choices=STAGES + REAL_STAGES + LOGIT_STAGES)
    ap.add_argument("--child-model", dest="model")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.model, args.out, args.lora_target)
        return
    if args.real:
        real_model(args)
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


def real_model(args: argparse.Namespace) -> None:
    from alignkit.algos.logprobs import CHUNK_ELEMENTS
    from alignkit.models.gguf import convert_gguf, smollm2_gguf

    model = convert_gguf(smollm2_gguf()) if args.real == "smollm2" else Path(args.real)
    target = "q_proj,k_proj,v_proj,o_proj" if args.lora_target == "q_proj,v_proj" else args.lora_target
    config = json.loads((model / "config.json").read_text())
    weights_mb = sum(os.path.getsize(p) for p in model.glob("*.safetensors")) / 2**20
    h, layers, kv = config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"]
    kv_dim = kv * config.get("head_dim", h // config["num_attention_heads"])
    per_layer = {"q_proj": (h, h), "k_proj": (h, kv_dim), "v_proj": (h, kv_dim), "o_proj": (h, h)}
    lora = sum(16 * (a + b) for name, (a, b) in per_layer.items() if name in target.split(",")) * layers
    lora_state_mb = lora * 4 * 4 / 2**20  # weights, grads, Adam m and v, float32
    chunk_mb = CHUNK_ELEMENTS * 4 / 2**20
    print(f"model: {model.name}, vocab {config['vocab_size']}, {weights_mb:.0f} MiB fp32; GRPO 4 prompts x 4, "
          f"32 new tokens, LoRA r16 on {target} ({lora / 1e6:.2f} M parameters)")
    with tempfile.TemporaryDirectory() as tmp:
        rss = {}
        for stage in LOGIT_STAGES:
            rss[stage] = median(peak_rss(stage, model, Path(tmp), target) for _ in range(args.repeats))
        logits_mb = 16 * 33 * config["vocab_size"] * 4 / 2**20
        print(f"log-prob math of one update micro-batch alone ((16, 33, {config['vocab_size']}) float32 logits = "
              f"{logits_mb:.0f} MiB), peak RSS above a bare torch process: row-wise "
              f"{rss['logprobs_rowwise'] - rss['torch_only']:.0f} MiB, chunked {rss['logprobs'] - rss['torch_only']:.0f} "
              f"MiB (floor: logits + their gradient + one chunk = {2 * logits_mb + chunk_mb:.0f} MiB)")
        for stage in REAL_STAGES:
            runs = [child_run(stage, model, Path(tmp) / f"{stage}{i}", target) for i in range(args.repeats)]
            peaks, cpu = [r["peak_rss_mb"] for r in runs], median(r["cpu_s"] for r in runs)
            rss[stage] = median(peaks)
            print(f"{stage}: peak RSS {rss[stage]:.0f} MiB (median of {len(runs)}: "
                  f"{', '.join(f'{r:.0f}' for r in peaks)}), CPU {cpu:.1f} s")
    floor = rss["load"] + lora_state_mb + chunk_mb
    print(f"floor (load-only {rss['load']:.0f} + LoRA state {lora_state_mb:.0f} + one chunk {chunk_mb:.0f}): {floor:.0f} MiB")
    print(f"bare process (torch, transformers and the trainer imported, no model): {rss['bare']:.0f} MiB")
    for stage in REAL_STAGES[2:]:
        print(f"{stage}: {rss[stage] / floor:.2f}x the floor, {rss[stage] / weights_mb:.2f}x the weights; "
              f"above the bare process {(rss[stage] - rss['bare']) / weights_mb:.2f}x the weights; "
              f"{rss[stage] - rss['load']:.0f} MiB above the load-only process")


if __name__ == "__main__":
    main()
