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

import sys

import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from alignkit.config import load_config
from alignkit.train import sharding
from alignkit.train.common import build_optimizer, make_accelerator
from alignkit.train.ppo.loop import build_models
from tests.rollout_counts import count_rollouts, counting


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

    count_rollouts(accelerator, model, ac, {"n_units": sum(isinstance(m, FSDPModule) for m in model.modules())}, result)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
