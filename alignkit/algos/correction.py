"""Importance-sampling corrections for samples the trained policy did not draw itself.

Two gaps make the sampling (behaviour) policy differ from the one the loss's ratio is taken
against: staleness (asynchronous RL samples with a policy some versions old) and engine/trainer
mismatch (vLLM's kernels and precision are not the trainer's). The loss stays PPO's (or GSPO's, or
CISPO's) against the proximal policy, and each token's term is weighted by
``w = pi_prox / pi_behaviour`` (decoupled PPO, Hilton et al. 2022; AReaL, Fu et al. 2025 sec. 5),
with its variance controlled one of two ways:

- ``tis``: truncated importance sampling, ``min(w, C)`` (Yao et al. 2025, "Your Efficient RL
  Framework Secretly Brings You Off-Policy RL Training").
- ``mis``: masked importance sampling: tokens (or whole responses) whose ``w`` leaves
  ``[low, C]`` are dropped from the loss, the rest keep ``w`` (Liu et al. 2025, "When Speed Kills
  Stability: Demystifying RL Collapse from the Training-Inference Mismatch").

``level: sequence`` uses one ratio per response, the geometric mean of its token ratios (as GSPO
does), so one outlier token does not decide alone.
"""

from __future__ import annotations

import torch

from alignkit.algos.normalize import masked_mean

IS_MODES = ("none", "tis", "mis")
IS_LEVELS = ("token", "sequence")


@torch.no_grad()
def importance_weights(proximal_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor,
                       mode: str = "tis", cap: float = 2.0, low: float = 0.5, level: str = "token"
                       ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(weights, keep, stats)`` for (B, T) log-probs over response tokens (``mask``).

    ``weights`` (B, T) multiply each token's loss term; ``keep`` (B, T) is 0 on tokens ``mis``
    drops (they leave the loss and its token count); stats: ``is/ratio_mean`` (the raw ratio's
    masked mean), ``is/clipped_frac`` (share truncated by ``tis``), ``is/masked_frac`` (share
    dropped by ``mis``)."""
    if mode not in IS_MODES or level not in IS_LEVELS:
        raise ValueError(f"importance correction {mode!r} at level {level!r}; expected {IS_MODES} x {IS_LEVELS}")
    mask = mask.to(proximal_logprobs.dtype)
    log_ratio = (proximal_logprobs - behaviour_logprobs).clamp(-20.0, 20.0) * mask
    if level == "sequence":
        log_ratio = masked_mean(log_ratio, mask, dim=1)[:, None].expand_as(mask)
    ratio = torch.exp(log_ratio)
    keep = torch.ones_like(ratio)
    weights = ratio
    if mode == "tis":
        weights = ratio.clamp(max=cap)
    elif mode == "mis":
        keep = ((ratio >= low) & (ratio <= cap)).to(ratio.dtype)
        weights = ratio * keep
    elif mode == "none":
        weights = torch.ones_like(ratio)
    stats = {"is/ratio_mean": masked_mean(ratio, mask),
             "is/clipped_frac": masked_mean((ratio > cap).to(ratio.dtype), mask) if mode == "tis" else ratio.new_zeros(()),
             "is/masked_frac": masked_mean(1 - keep, mask)}
    return weights * mask, keep, stats
