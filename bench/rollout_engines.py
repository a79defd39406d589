"""Rollout tokens/s of the ``hf`` engine vs ``vllm`` (colocated) vs ``vllm_server`` (a vLLM OpenAI
server in its own process) on the same model, prompts, lengths and sampling settings, and what a
weight sync costs: colocated LoRA-layers and full syncs, the server's LoRA hot-swap (adapter
saved, loaded under a new name, previous one unloaded) and the server's full sync through the
sharded path (``full_sync``: buckets of whole layers written and reloaded in place by the server;
here from one process, so the gathers are no-ops and the figure is the write + reload + RPC cost). Prints figures; not a test. Needs vLLM:

    ./scripts/setup_vllm.sh && .venv-vllm/bin/python bench/rollout_engines.py [--repeats 3] [--setups tiny,50m]

Setups (models built from a config, no downloads; float32; LoRA r 8 on q_proj,v_proj as in
examples/ppo_tiny.yaml; temperature 1, no top-k/top-p):
  tiny  build_tiny's model (0.7 M parameters), 16 prompts x 32 new tokens (the PPO reference step)
  50m   Qwen2 hidden 768, intermediate 2048, 8 layers, 12 heads / 4 KV heads (50.3 M parameters,
        random weights), 64 prompts x 128 new tokens
Every row samples exactly ``new_tokens`` tokens (no stop tokens), so both engines do the same
work. The hf engine samples from the peft policy, as the PPO loop does; vLLM
from the merged weights pushed by ``sync_weights``. Each figure is the median of ``--repeats``
timed calls after one warm-up call.

On 2 CPU cores vLLM's auto binding computes on one core and keeps the other for its scheduler, so
hf is timed with one intra-op thread (like for like) and with two.

GPU recipe (regular ``vllm`` next to a CUDA torch, ``pip install -e ".[vllm]"``):
    python bench/rollout_engines.py --setups 50m,tiny --repeats 5 --dtype bfloat16
and, for a real model, ``--model DIR`` (any local HF causal-LM directory) with ``--prompts 256
--new-tokens 512``; there vLLM's paged attention, continuous batching and CUDA graphs decide.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from alignkit.data.collators import pad_left
from alignkit.generation import EngineContext, HFEngine, SamplingParams, engine_settings
from alignkit.generation.server_engine import VLLMServerEngine, server_args
from alignkit.generation.server_process import FULL_SYNC_EXTENSION, ServerProcess, full_sync_env, vllm_python
from alignkit.generation.vllm_engine import VLLMEngine
from alignkit.models.loading import load_tokenizer
from alignkit.models.tiny import build_tiny, corpus_lines

SETUPS = {  # name: (build_tiny settings, prompts, new tokens)
    "tiny": ({}, 16, 32),
    "50m": (dict(hidden_size=768, intermediate_size=2048, num_layers=8, num_heads=12, num_kv_heads=4,
                 pretrain_steps=0), 64, 128),
}


def chat_prompts(tokenizer, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` left-padded ChatML prompts from the shipped corpus's questions."""
    questions = [line.split("? ")[0] + "?" for line in corpus_lines() if "? " in line]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": questions[i % len(questions)]}],
                                           tokenize=False, add_generation_prompt=True) for i in range(n)]
    return pad_left([tokenizer.encode(t, add_special_tokens=False) for t in texts], tokenizer.pad_token_id)


def tokens_per_s(engine, ids, mask, sampling, repeats: int) -> float:
    engine.generate(ids, mask, sampling)  # warm-up: allocations, first-call paths
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        roll = engine.generate(ids, mask, sampling)
        rates.append(float(roll.response_mask.sum()) / (time.perf_counter() - t0))
    return statistics.median(rates)


def fake_update(policy) -> None:
    """Stand-in for an optimizer step: move the LoRA B matrices."""
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 1e-3)


def sync_costs(engine: VLLMEngine, policy, repeats: int) -> dict[str, float]:
    """Median seconds and MB of a LoRA sync (changed fused layers only) and of a full sync."""
    partial, full = [], []
    for _ in range(repeats):
        fake_update(policy)
        engine.sync_weights(policy)
        partial.append(dict(engine.last_sync))
        engine.synced_lm = None  # as for a policy the engine has not seen: every weight
        engine.sync_weights(policy)
        full.append(dict(engine.last_sync))
    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    return {"lora_s": med(partial, "seconds"), "lora_mb": med(partial, "bytes") / 1e6,
            "full_s": med(full, "seconds"), "full_mb": med(full, "bytes") / 1e6}


def server_rates(model_dir: Path, policy, tok, ids, mask, sampling, max_len: int, args) -> dict[str, float]:
    """tokens/s of one alignkit-launched server (same interpreter), startup and LoRA hot-swap cost."""
    ctx = EngineContext(str(model_dir), tok.pad_token_id, args.dtype, max_len, 0)
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        settings = engine_settings({"engine": "vllm_server", "gpu_memory_utilization": 0.5})
        proc = ServerProcess(vllm_python(None), model_dir, [*server_args(settings, policy, ctx), "--worker-extension-cls",
                                                            FULL_SYNC_EXTENSION], Path(work) / "log", env=full_sync_env())
        try:
            proc.wait_healthy(900)
            startup = time.perf_counter() - t0
            engine = VLLMServerEngine([proc.url], tok.pad_token_id, Path(work), processes=[proc])
            engine.sync_weights(policy)
            rate = tokens_per_s(engine, ids, mask, sampling, args.repeats)
            swaps = []
            for _ in range(args.repeats):
                fake_update(policy)
                engine.push_adapter(policy)
                swaps.append(dict(engine.last_sync))
            full = {mb: full_sync_cost(proc.url, model_dir, tok.pad_token_id, Path(work), mb, args)
                    for mb in (256.0, 1e-6)}  # the default bucket, and one layer per bucket
            engine.close()  # stops the server
        finally:
            proc.stop()
    return {"rate": rate, "startup": startup, "swap_s": statistics.median(r["seconds"] for r in swaps),
            "swap_mb": statistics.median(r["bytes"] for r in swaps) / 1e6, "full": full}


def full_sync_cost(url: str, model_dir: Path, pad: int, work: Path, bucket_mb: float, args) -> dict[str, float]:
    """Median seconds, MB and buckets of the server's full sync of a plain (full fine-tuning) model."""
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype))
    engine = VLLMServerEngine([url], pad, work, full_sync_mb=bucket_mb)
    rows = []
    for _ in range(args.repeats):
        with torch.no_grad():
            for p in plain.parameters():
                p.add_(torch.randn_like(p) * 1e-4)
        engine.push_full(plain)
        rows.append(dict(engine.last_sync))
    return {k: statistics.median(r[k] for r in rows) for k in ("seconds", "bytes", "buckets", "max_bucket_bytes")}


def run_setup(name: str, model_dir: Path, n_prompts: int, new_tokens: int, args) -> None:
    tok = load_tokenizer(str(model_dir))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).to(device).eval()
    n_params = sum(p.numel() for p in base.parameters())
    policy = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    ids, mask = (t.to(device) for t in chat_prompts(tok, n_prompts))
    sampling = SamplingParams(new_tokens, (), temperature=1.0)  # no stop tokens: every row samples new_tokens
    print(f"\n[{name}] {n_params / 1e6:.1f} M parameters, {n_prompts} prompts (longest {ids.shape[1]} tokens) "
          f"x {new_tokens} new tokens, {args.dtype}, median of {args.repeats}")
    hf = HFEngine(policy, tok.pad_token_id)
    rates = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.no_grad():
            rates[f"hf ({threads} thread{'s' * (threads > 1)})"] = tokens_per_s(hf, ids, mask, sampling, args.repeats)
    t0 = time.perf_counter()
    engine = VLLMEngine(model_dir, tok.pad_token_id, dtype=args.dtype, max_model_len=ids.shape[1] + new_tokens + 8)
    startup = time.perf_counter() - t0
    try:
        engine.sync_weights(policy)
        rates["vllm"] = tokens_per_s(engine, ids, mask, sampling, args.repeats)
        sync = sync_costs(engine, policy, args.repeats)
    finally:
        engine.close()
    server = server_rates(model_dir, policy, tok, ids, mask, sampling, ids.shape[1] + new_tokens + 8, args)
    rates["vllm_server"] = server["rate"]
    for k, v in rates.items():
        print(f"  {k:<16} {v:9.1f} tokens/s   x{v / rates['hf (1 thread)']:.2f} vs hf (1 thread)")
    print(f"  vllm startup {startup:.1f} s; sync after a LoRA update {sync['lora_s'] * 1e3:.0f} ms "
          f"({sync['lora_mb']:.1f} MB), full sync {sync['full_s'] * 1e3:.0f} ms ({sync['full_mb']:.1f} MB)")
    print(f"  vllm_server startup {server['startup']:.1f} s; LoRA hot-swap (save, load as a new name, unload the "
          f"old) {server['swap_s'] * 1e3:.0f} ms ({server['swap_mb']:.2f} MB adapter)")
    for mb, f in server["full"].items():
        print(f"  vllm_server full sync, sync_bucket_mb {mb:g}: {f['seconds'] * 1e3:.0f} ms ({f['bytes'] / 1e6:.1f} MB "
              f"in {f['buckets']:.0f} buckets, largest {f['max_bucket_bytes'] / 1e6:.2f} MB)  "
              f"x{f['seconds'] / server['swap_s']:.1f} the LoRA hot-swap")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--setups", default="tiny,50m", help=f"comma-separated, of {sorted(SETUPS)}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--model", help="a local HF causal-LM directory instead of the built models")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    args = p.parse_args()
    if args.model:
        run_setup(Path(args.model).name, Path(args.model), args.prompts, args.new_tokens, args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.setups.split(","):
            settings, n_prompts, new_tokens = SETUPS[name]
            run_setup(name, build_tiny(Path(tmp) / name, **settings), n_prompts, new_tokens, args)


if __name__ == "__main__":
    main()
