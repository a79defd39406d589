"""The rollout-engine seam: the RL loop asks an engine for samples and never knows which one it holds.

An engine turns a left-padded batch of prompts (and their images, on a VL model) into a ``Rollout``
(tokens, masks, EOS flags, and its own log-probs when it has them), is told when the policy's
weights changed (``sync_weights``) and reports whether it still samples from them (``check_sync``).
Log-probs used in the loss come from the trainer's own forward pass; an engine's are kept as the
behaviour log-probs of what it sampled. Engines are built by name (``registry.build_engine``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from alignkit.generation.sampling import OnFinished, Rollout, sample
from alignkit.generation.weights import SyncCheck, check_sync
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
    """``generate`` samples one response per row; ``sync_weights`` follows a policy update;
    ``check_sync`` says whether the engine still samples from the policy's weights.

    An engine whose class sets ``reports_finished = True`` also takes ``on_finished`` in
    ``generate`` and calls it for each row as soon as that row's response is finished (so its
    scoring starts early); the loop passes it to no other engine."""

    def generate(self, query_ids: torch.Tensor, query_mask: torch.Tensor, sampling: SamplingParams,
                 pixels: dict[str, torch.Tensor] | None = None) -> Rollout:
        """(B, Q) left-padded prompt ids and mask -> a ``Rollout`` of B sequences. ``pixels``: the
        rows' image inputs (a VL model); an engine registered without ``accepts_images`` never gets them.
        ``on_finished`` (engines with ``reports_finished``): see ``sampling.OnFinished``."""
        ...

    def sync_weights(self, policy: torch.nn.Module) -> None:
        """Make the next ``generate`` sample from ``policy``'s current weights."""
        ...

    def check_sync(self, rollouts: list[Rollout], trainer_logprobs: list[torch.Tensor], sampling: SamplingParams
                   ) -> SyncCheck | None:
        """The engine's log-probs of its samples against the trainer's, (b, R) per chunk; None when
        the engine reports none."""
        ...

    def close(self) -> None:
        """Free what the engine holds (processes, device memory)."""
        ...


def engine_sync_check(engine_tolerance: float, rollouts: list[Rollout], trainer_logprobs: list[torch.Tensor],
                      sampling: SamplingParams) -> SyncCheck | None:
    """``check_sync`` for an engine that puts its own log-probs in ``Rollout.logprobs``."""
    return check_sync([r.logprobs for r in rollouts], trainer_logprobs, [r.response_mask for r in rollouts],
                      sampling.top_k > 0 or sampling.top_p < 1.0, engine_tolerance)


class HFEngine:
    """alignkit's own KV-cache sampler on the trained model itself (``sampling.sample``).

    It samples from the very module being trained, so ``sync_weights`` has nothing to copy. It
    takes image prompts (``pixels``: a Qwen-VL chunk's pixel inputs). ``with_logprobs`` makes it
    report its own log-probs, so ``check_sync`` checks that the KV-cache loop (positions, images)
    and the training forward agree; off by default, since a bf16 cache drifts.
    """

    reports_finished = True

    def __init__(self, model: torch.nn.Module, pad_token_id: int, with_logprobs: bool = False,
                 sync_tolerance: float = 0.05):
        self.model = model
        self.pad_token_id = pad_token_id
        self.with_logprobs = with_logprobs
        self.sync_tolerance = sync_tolerance
        # A VL model's image/video pad tokens are never sampled: every later forward would take a
        # sampled one for an image slot (and fail on the count of image features).
        self.suppress_ids = placeholder_token_ids(model)

    def generate(self, query_ids: torch.Tensor, query_mask: torch.Tensor, sampling: SamplingParams,
                 pixels: dict[str, torch.Tensor] | None = None, on_finished: OnFinished | None = None) -> Rollout:
        return sample(self.model, self.pad_token_id, query_ids, query_mask, sampling.max_new_tokens,
                      sampling.temperature, sampling.top_k, sampling.top_p, list(sampling.eos_ids), pixels,
                      self.suppress_ids, self.with_logprobs, on_finished)

    def sync_weights(self, policy: torch.nn.Module) -> None:
        return None

    def check_sync(self, rollouts: list[Rollout], trainer_logprobs: list[torch.Tensor], sampling: SamplingParams
                   ) -> SyncCheck | None:
        return engine_sync_check(self.sync_tolerance, rollouts, trainer_logprobs, sampling)

    def close(self) -> None:
        return None
