"""Sampling (KV-cache loop, stop tokens, EOS masks) and the rollout engines behind ``RolloutEngine``."""

from alignkit.generation.engine import HFEngine, RolloutEngine, SamplingParams
from alignkit.generation.sampling import (
    Rollout,
    decode_responses,
    filter_logits,
    first_eos_mask,
    sample,
    stop_token_ids,
)

__all__ = [
    "HFEngine",
    "Rollout",
    "RolloutEngine",
    "SamplingParams",
    "decode_responses",
    "filter_logits",
    "first_eos_mask",
    "sample",
    "stop_token_ids",
]
