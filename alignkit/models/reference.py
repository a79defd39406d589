"""The reference model without a second copy: the same LoRA-adapted model with its adapters disabled.

PPO (``ActorCritic.reference_logits``) and the offline preference stages (DPO, KTO) both read
reference log-probs this way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from peft import PeftModel
from torch import nn


@contextmanager
def keep_grad_flags(model: nn.Module) -> Iterator[None]:
    """Restore every parameter's ``requires_grad`` on exit.

    peft's ``set_adapter`` (also called when ``disable_adapter`` re-enables adapters) sets
    ``requires_grad`` on the active adapter only, which would silently freeze every other
    adapter (PPO's critic adapter, after the first reference pass).
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def adapters_disabled(model: PeftModel) -> Iterator[None]:
    """Run ``model`` as its base (merged SFT adapters included): the reference policy."""
    with keep_grad_flags(model), model.disable_adapter():
        yield
