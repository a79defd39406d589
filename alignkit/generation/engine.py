"""The rollout-engine seam: the RL loop asks an engine for samples and never knows which one it holds.

An engine turns a left-padded batch of prompts into a ``Rollout`` (tokens, masks, EOS flags)
and is told when the policy's weights changed (``sync_weights``). Log-probs used in any loss
come from the trainer's own forward pass, never from the engine: an engine only samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from alignkit.generation.sampling import Rollout, sample
from alignkit.models.architectures import placeholder_token_ids


@dataclass(frozen=True)
class SamplingParams:
    """How responses are sampled; the same temperature is used for the trainer's log-probs."""

    max_new_tokens: int
    eos_ids: tuple[int, ...]
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off


@runtime_checkable
class RolloutEngine(Protocol):
    """``generate`` samples one response per row; ``sync_weights`` follows a policy update."""

    def generate(self, query_ids: torch.Tensor, query_mask: torch.Tensor, sampling: SamplingParams) -> Rollout:
        """(B, Q) left-padded prompt ids and mask -> a ``Rollout`` of B sequences. An engine that takes
        image prompts sets ``accepts_images = True`` and takes a ``pixels=`` keyword (HFEngine)."""
        ...

    def sync_weights(self, policy: torch.nn.Module) -> None:
        """Make the next ``generate`` sample from ``policy``'s current weights."""
        ...

    def close(self) -> None:
        """Free what the engine holds (processes, device memory)."""
        ...


class HFEngine:
    """alignkit's own KV-cache sampler on the trained model itself (``sampling.sample``).

    It samples from the very module being trained, so ``sync_weights`` has nothing to copy. It
    takes image prompts (``pixels``: a Qwen-VL chunk's pixel inputs). ``with_logprobs`` makes it
    report its own log-probs, so ``rollout/engine_logprob_diff`` checks that the KV-cache loop
    (positions, images) and the training forward agree; off by default, since a bf16 cache drifts.
    """

    accepts_images = True

    def __init__(self, model: torch.nn.Module, pad_token_id: int, with_logprobs: bool = False):
        self.model = model
        self.pad_token_id = pad_token_id
        self.with_logprobs = with_logprobs
        # A VL model's image/video pad tokens are never sampled: every later forward would take a
        # sampled one for an image slot (and fail on the count of image features).
        self.suppress_ids = placeholder_token_ids(model)

    def generate(self, query_ids: torch.Tensor, query_mask: torch.Tensor, sampling: SamplingParams,
                 pixels: dict | None = None) -> Rollout:
        return sample(self.model, self.pad_token_id, query_ids, query_mask, sampling.max_new_tokens,
                      sampling.temperature, sampling.top_k, sampling.top_p, list(sampling.eos_ids), pixels,
                      self.suppress_ids, self.with_logprobs)

    def sync_weights(self, policy: torch.nn.Module) -> None:
        return None

    def close(self) -> None:
        return None
