"""What the two rollout probes (tests/zero3_rollout_probe.py, tests/fsdp_rollout_probe.py) share:
a call counter to wrap collectives with, and the measurement itself — sample N tokens with the
engine the PPO loop uses, inside ``sharding.rollout_context`` and without it, counting per N."""

from __future__ import annotations

import json
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch

from alignkit.generation import HFEngine, SamplingParams
from alignkit.train import sharding

COUNTS: Counter = Counter()


def counting(name: str, fn):
    def wrapper(*args, **kwargs):
        COUNTS[name] += 1
        return fn(*args, **kwargs)
    return wrapper


def count_rollouts(accelerator, model, ac, out: dict, result: str) -> None:
    """Fill ``out`` with {"gather_once": {N: counts}, "per_layer": {N: counts}} for N = 2 and 8,
    check the model still trains afterwards, and write ``out`` to ``result`` on rank 0."""
    engine = HFEngine(ac.lm, pad_token_id=0)
    ids = torch.randint(5, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    out.update(gather_once={}, per_layer={})
    for mode, context in (("gather_once", lambda: sharding.rollout_context(accelerator, model, ac.lm)),
                          ("per_layer", nullcontext)):
        for n in (2, 8):
            COUNTS.clear()
            with context():
                roll = engine.generate(ids, torch.ones_like(ids), SamplingParams(n, eos_ids=(10_000,)))
            assert roll.response_mask.shape[1] == n
            out[mode][n] = dict(COUNTS)
    # The model still trains after the rollout (hooks back in place, resharded): a forward with gradients.
    logits, _ = model(ids, torch.ones_like(ids), 3)
    accelerator.backward(logits.float().mean())
    if accelerator.is_main_process:
        Path(result).write_text(json.dumps(out))
    accelerator.wait_for_everyone()
