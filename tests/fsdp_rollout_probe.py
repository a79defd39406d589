"""Counts FSDP2's parameter all-gathers during one rollout; launched on two processes by
tests/test_sharded.py (``accelerate launch`` with examples/accelerate/fsdp.yaml).

    python -m tests.fsdp_rollout_probe PPO_CONFIG.yaml RESULT.json key=value ...

Builds and shards the policy as ``alignkit.train.ppo`` does and samples a batch of N tokens with the
engine the PPO loop uses, inside ``sharding.rollout_context`` and without it. It counts what really
happens: the all-gather collectives FSDP2 issues (``torch.distributed.all_gather_single``, its call in
torch 2.13, and ``all_gather_into_tensor``). Rank 0 writes {"gather_once": {N: counts},
"per_layer": {N: counts}, "n_units": FSDP units}.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

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
    assert sharding.backend(accelerator) == "fsdp", sharding.backend(accelerator)
    ac = build_models(cfg)
    sharding.shard(accelerator, ac)
    optimizer, _ = build_optimizer(cfg, ac.trainable_parameters(), 1)
    model, optimizer = sharding.prepare(accelerator, ac, optimizer)
    for name in ("all_gather_single", "all_gather_into_tensor"):  # FSDP2's collectives.py calls dist.<name>
        if hasattr(dist, name):
            setattr(dist, name, counting("all_gather", getattr(dist, name)))

    engine = HFEngine(ac.lm, pad_token_id=0)
    ids = torch.randint(5, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    out: dict = {"gather_once": {}, "per_layer": {}, "n_units": sum(isinstance(m, FSDPModule) for m in model.modules())}
    for mode, context in (("gather_once", lambda: sharding.rollout_context(accelerator, model, ac.lm)),
                          ("per_layer", nullcontext)):
        for n in (2, 8):
            COUNTS.clear()
            with context():
                roll = engine.generate(ids, torch.ones_like(ids), SamplingParams(n, eos_ids=(10_000,)))
            assert roll.response_mask.shape[1] == n
            out[mode][n] = dict(COUNTS)
    # The model still trains after the rollout (resharded, hooks as before): a forward with gradients.
    logits, _ = model(ids, torch.ones_like(ids), 3)
    accelerator.backward(logits.float().mean())
    if accelerator.is_main_process:
        Path(result).write_text(json.dumps(out))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
