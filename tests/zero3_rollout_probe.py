"""Counts DeepSpeed ZeRO-3's parameter gathers during one rollout; launched on two processes by
tests/test_sharded.py (``accelerate launch`` with examples/accelerate/deepspeed_zero3.yaml).

    python -m tests.zero3_rollout_probe PPO_CONFIG.yaml RESULT.json key=value ...

Builds the policy as ``alignkit.train.ppo`` does, prepares it under ZeRO-3 and samples a batch of
N tokens with the engine the PPO loop uses, inside ``sharding.rollout_context`` and without it. It
counts what really happens: DeepSpeed's all-gather collectives (its comm backend) and entries into
``GatheredParameters``. Rank 0 writes {"gather_once": {N: counts}, "per_layer": {N: counts},
"n_params": parameters of the policy LM}.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import deepspeed
import torch
from deepspeed import comm

from alignkit.config import load_config
from alignkit.generation import HFEngine, SamplingParams
from alignkit.train import sharding
from alignkit.train.common import build_optimizer, make_accelerator
from alignkit.train.ppo.loop import build_models

COUNTS: Counter = Counter()


def counting(name: str, fn):
    def wrapper(*args, **kwargs):
        COUNTS[name] += 1
        return fn(*args, **kwargs)
    return wrapper


def main(config: str, result: str, overrides: list[str]) -> None:
    cfg = load_config(config, overrides)
    accelerator = make_accelerator()
    ac = build_models(cfg)
    optimizer, _ = build_optimizer(cfg, ac.trainable_parameters(), 1)
    sharding.configure(accelerator, cfg.per_device_train_batch_size, 1, cfg.max_grad_norm)
    model, optimizer = accelerator.prepare(ac, optimizer)
    assert sharding.backend(accelerator) == "zero3", sharding.backend(accelerator)
    backend = comm.comm.cdb  # DeepSpeed's communication backend: every ZeRO all-gather goes through it
    for name in ("all_gather_into_tensor", "all_gather", "all_gather_coalesced"):
        if hasattr(backend, name):
            setattr(backend, name, counting(name, getattr(backend, name)))
    deepspeed.zero.GatheredParameters.__enter__ = counting("GatheredParameters", deepspeed.zero.GatheredParameters.__enter__)

    engine = HFEngine(ac.lm, pad_token_id=0)
    ids = torch.randint(5, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    out: dict = {"gather_once": {}, "per_layer": {}, "n_params": len(list(ac.lm.parameters()))}
    for mode, context in (("gather_once", lambda: sharding.rollout_context(accelerator, model, ac.lm)),
                          ("per_layer", nullcontext)):
        for n in (2, 8):
            COUNTS.clear()
            with context():
                roll = engine.generate(ids, torch.ones_like(ids), SamplingParams(n, eos_ids=(10_000,)))
            assert roll.response_mask.shape[1] == n
            out[mode][n] = dict(COUNTS)
    # The model still trains after the rollout (hooks back in place): a forward with gradients.
    logits, _ = model(ids, torch.ones_like(ids), 3)
    accelerator.backward(logits.float().mean())
    if accelerator.is_main_process:
        Path(result).write_text(json.dumps(out))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
