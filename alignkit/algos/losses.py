"""Policy losses behind one signature and one registry.

A policy loss maps one micro-batch's ``LossInputs`` to ``(loss, stats)``: a scalar with grad and
detached scalar stats (``approxkl``, ``clipfrac``). Adding a loss is one function plus one
``register_loss`` line; ``policy_loss: NAME`` in a config then selects it. A spec carries the
loss's own defaults (clip range, ``loss_agg_mode``), which a config uses for keys it does not set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from alignkit.algos.normalize import masked_mean
from alignkit.algos.ppo import aggregate_loss


@dataclass(frozen=True)
class LossInputs:
    """What a policy loss may read; (B, T) tensors over response tokens, right-padded (``mask``)."""

    logprobs: torch.Tensor  # (B, T) the policy's log-probs, with grad
    old_logprobs: torch.Tensor  # (B, T) log-probs of the policy the ratio is taken against (no grad)
    advantages: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T) float: tokens that enter the loss
    cliprange_low: float = 0.2  # ratio clipped below at 1 - cliprange_low
    cliprange_high: float = 0.2  # ... and above at 1 + cliprange_high
    loss_agg_mode: str = "token_mean"
    max_len: int | None = None  # seq_mean_token_sum_norm's constant (max_new_tokens)
    # (B, T) per-token weights multiplied into every loss term (no grad): an off-policy correction
    # (truncated importance sampling); None is a weight of 1.
    weights: torch.Tensor | None = None

    def aggregate(self, per_token: torch.Tensor) -> torch.Tensor:
        if self.weights is not None:
            per_token = per_token * self.weights
        return aggregate_loss(per_token, self.mask, self.loss_agg_mode, self.max_len)


PolicyLoss = Callable[[LossInputs], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss and its defaults (None: the config's general default applies)."""

    fn: PolicyLoss
    cliprange_low: float | None = None
    cliprange_high: float | None = None
    loss_agg_mode: str | None = None


POLICY_LOSSES: dict[str, LossSpec] = {}
# OpenRLHF's (--policy_loss_type) and verl's (actor.policy_loss.loss_mode) spellings.
LOSS_ALIASES: dict[str, str] = {}


def register_loss(name: str, fn: PolicyLoss, *, aliases: tuple[str, ...] = (), cliprange_low: float | None = None,
                  cliprange_high: float | None = None, loss_agg_mode: str | None = None) -> None:
    POLICY_LOSSES[name] = LossSpec(fn, cliprange_low, cliprange_high, loss_agg_mode)
    LOSS_ALIASES.update({alias: name for alias in aliases})


def compute_policy_loss(name: str, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, stats)`` of the registered loss ``name``."""
    if name not in POLICY_LOSSES:
        raise KeyError(f"unknown policy loss {name!r}; registered: {', '.join(sorted(POLICY_LOSSES))}")
    return POLICY_LOSSES[name].fn(inputs)


def ppo_clip(x: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate objective, per token (Schulman et al. 2017, eq. 7). The ratio is clipped to
    [1 - low, 1 + high]; a larger ``high`` is DAPO's clip-higher (Yu et al. 2025 sec. 3.1).
    Stats: ``approxkl`` (½ mean (logp - old)², as TRL) and ``clipfrac`` (share of tokens where the
    clipped term is the active one)."""
    log_ratio = x.logprobs - x.old_logprobs
    ratio = torch.exp(log_ratio)
    pg_losses = -x.advantages * ratio
    pg_losses_clipped = -x.advantages * torch.clamp(ratio, 1.0 - x.cliprange_low, 1.0 + x.cliprange_high)
    loss = x.aggregate(torch.maximum(pg_losses, pg_losses_clipped))
    with torch.no_grad():
        stats = {"approxkl": 0.5 * masked_mean(log_ratio.square(), x.mask),
                 "clipfrac": masked_mean((pg_losses_clipped > pg_losses).to(x.logprobs.dtype), x.mask)}
    return loss, stats


def gspo(x: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", eq. 5-7 and GSPO-token eq. 13):
    one importance ratio per response, the geometric mean of its token ratios
    ``s_i = exp(mean_t (logp - old))``, clipped per sequence. Written per token as
    ``s_i,t = sg[s_i] * pi(y_t) / sg[pi(y_t)]`` so the value is ``s_i`` on every token and the
    gradient is the paper's (the mean of the token log-prob gradients, scaled by ``s_i``). The
    ratio's log is capped at 10 so one far-off response cannot overflow."""
    log_ratio = x.logprobs - x.old_logprobs
    seq_log_ratio = masked_mean(log_ratio, x.mask, dim=1)  # (B,)
    token_log_ratio = x.logprobs - x.logprobs.detach() + seq_log_ratio.detach()[:, None]  # (B, T), value = seq's
    ratio = torch.exp(token_log_ratio.clamp(max=10.0))
    pg_losses = -x.advantages * ratio
    pg_losses_clipped = -x.advantages * torch.clamp(ratio, 1.0 - x.cliprange_low, 1.0 + x.cliprange_high)
    loss = x.aggregate(torch.maximum(pg_losses, pg_losses_clipped))
    with torch.no_grad():
        rows = x.mask.sum(1) > 0
        clipped = (pg_losses_clipped > pg_losses).to(x.logprobs.dtype)
        stats = {"approxkl": 0.5 * masked_mean(log_ratio.square(), x.mask),
                 # share of responses clipped (the unit GSPO clips)
                 "clipfrac": masked_mean(clipped, x.mask, dim=1)[rows].mean() if rows.any() else clipped.sum() * 0}
    return loss, stats


def cispo(x: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO (MiniMax-M1, Chen et al. 2025, eq. 4-5): REINFORCE with the importance weight clipped
    and stop-gradient, ``-sg(clip(r, 1 - low, 1 + high)) * A * logp``. Unlike PPO's clip, a token
    past the bound still gets a gradient (through ``logp``), only its weight is capped, so the rare
    "however"/"wait" tokens that drive reflection keep learning. The paper sets no lower bound
    (``cliprange_low`` 1: weights >= 0) and tunes only the upper one."""
    log_ratio = x.logprobs - x.old_logprobs
    ratio = torch.exp(log_ratio.detach())
    weight = torch.clamp(ratio, 1.0 - x.cliprange_low, 1.0 + x.cliprange_high)
    loss = x.aggregate(-weight * x.advantages * x.logprobs)
    with torch.no_grad():
        stats = {"approxkl": 0.5 * masked_mean(log_ratio.square(), x.mask),
                 "clipfrac": masked_mean((weight != ratio).to(x.logprobs.dtype), x.mask)}
    return loss, stats


register_loss("ppo", ppo_clip, aliases=("vanilla", "ppo_clip", "clip"))
# GSPO's sequence ratio stays near 1, so its clip range is ~3 orders of magnitude tighter than
# PPO's token one (the paper's 3e-4 / 4e-4), and its loss is a mean per response first.
register_loss("gspo", gspo, aliases=("gspo_token",), cliprange_low=3e-4, cliprange_high=4e-4,
              loss_agg_mode="seq_mean_token_mean")
# No lower bound, upper 0.28 (DAPO's clip-higher value; Trinity-RFT's CISPO default).
register_loss("cispo", cispo, cliprange_low=1.0, cliprange_high=0.28)
