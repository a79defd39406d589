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

import sys

import deepspeed
from deepspeed import comm

from alignkit.config import load_config
from alignkit.train import sharding
from alignkit.train.common import build_optimizer, make_accelerator
from alignkit.train.ppo.loop import build_models
from tests.rollout_counts import count_rollouts, counting


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

    count_rollouts(accelerator, model, ac, {"n_params": len(list(ac.lm.parameters()))}, result)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
