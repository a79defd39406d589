"""``alignkit train`` with the full-fine-tuning server sync watched from outside: at every bucket of every
sync, each rank appends to ``$FULL_SYNC_LOG`` how many parameter bytes are whole on it at that moment,
read from the sharding's own state rather than from ``full_sync``'s statistics:

- ZeRO-3: every parameter whose ``ds_status`` is AVAILABLE (gathered; small persistent ones included),
- FSDP2: every parameter that is not a ``DTensor`` shard,
- plus the bucket's gathered CPU copies,

and the model's whole size, for tests/test_vllm_server.py. Under ZeRO-3 the probe also sets DeepSpeed's
``stage3_param_persistence_threshold`` to 0: every weight of the tiny model is under its default (1e5
elements), so DeepSpeed would keep them all whole on every rank and there would be nothing to measure. ``sync`` counts the pushes: the first (at the
run's first rollout, inside the rollout's gather) reads weights already whole.

    python -m tests.full_sync_probe CONFIG.yaml key=value ...
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager

from alignkit.cli import main
from alignkit.generation import full_sync, server_engine
from alignkit.generation.weights import plain_model
from alignkit.train import sharding

MODEL = {}


def whole_bytes(model) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for p in model.parameters():
        status = getattr(p, "ds_status", None)
        whole = status.name == "AVAILABLE" if status is not None else not isinstance(p, DTensor)
        total += full_sync.numel(p) * p.element_size() if whole else 0
    return total


def watch() -> None:
    real_gather, real_push = full_sync.gathered_bucket, server_engine.push_full

    @contextmanager
    def gathered_bucket(bucket):
        with real_gather(bucket) as tensors:
            copies = sum(t.numel() * t.element_size() for t in tensors.values())
            row = {"rank": int(os.environ["RANK"]), "sync": MODEL["syncs"], "whole": whole_bytes(MODEL["m"]) + copies,
                   "model": sum(full_sync.numel(p) * p.element_size() for p in MODEL["m"].parameters())}
            with open(os.environ["FULL_SYNC_LOG"], "a") as f:
                f.write(json.dumps(row) + "\n")
            yield tensors

    def push_full(lm, *args, **kwargs):
        MODEL["m"], MODEL["syncs"] = plain_model(lm)[0], MODEL.get("syncs", 0) + 1
        return real_push(lm, *args, **kwargs)

    real_configure = sharding.configure

    def configure(accelerator, *args, **kwargs):
        real_configure(accelerator, *args, **kwargs)
        if sharding.is_deepspeed(accelerator):
            accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"][
                "stage3_param_persistence_threshold"] = 0

    full_sync.gathered_bucket, server_engine.push_full, sharding.configure = gathered_bucket, push_full, configure


if __name__ == "__main__":
    watch()
    sys.exit(main(["train", *sys.argv[1:]]))
