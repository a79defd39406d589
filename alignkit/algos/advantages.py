"""Advantage estimators behind one signature and one registry.

An estimator maps one rollout batch to ``(advantages, returns)``, both (B, R) over response
tokens. ``returns`` are the value targets; an estimator without a critic returns the
advantages there too (nothing reads them). Adding an estimator is one function plus one
``register_estimator`` line; ``advantage_estimator: NAME`` in a config then selects it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from alignkit.algos.normalize import masked_whiten
from alignkit.algos.ppo import compute_gae


@dataclass(frozen=True)
class AdvantageInputs:
    """What an estimator may read; all response tensors are right-padded, described by ``mask``."""

    rewards: torch.Tensor  # (B, R) shaped per-token rewards: -kl_coef * KL, score added at the last token
    scores: torch.Tensor  # (B,) post-processed sequence scores (0 where the score failed)
    mask: torch.Tensor  # (B, R) response tokens of samples with a valid score
    values: torch.Tensor | None = None  # (B, R) critic values; None when the run has no critic
    group_ids: torch.Tensor | None = None  # (B,) prompt index of each sample, for group baselines
    valid: torch.Tensor | None = None  # (B,) bool: the score may enter a baseline; default: rows of mask with a token

    def valid_rows(self) -> torch.Tensor:
        return self.valid.bool() if self.valid is not None else self.mask.sum(1) > 0


@dataclass(frozen=True)
class AdvantageParams:
    """Hyper-parameters an estimator may use (paper names)."""

    gamma: float = 1.0
    lam: float = 0.95
    whiten: bool = True  # whiten advantages over the batch (masked mean 0, std 1)


Estimator = Callable[[AdvantageInputs, AdvantageParams], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class EstimatorSpec:
    """A registered estimator, what it needs from a run and the defaults it brings. A config reads
    these for the keys it does not set, and never names an estimator itself."""

    fn: Estimator
    needs_critic: bool = True  # the run builds a value head and trains it only when True
    needs_groups: bool = False  # compares responses to one prompt: num_generations >= 2
    kl_in_loss: bool = False  # default of use_kl_loss: KL as a loss term (GRPO) rather than a reward penalty
    loss_agg_mode: str = "token_mean"  # default loss_agg_mode
    beta: float | None = None  # default init_kl_coef (None: 0.04 for a KL loss, 0.2 for a KL penalty)


ESTIMATORS: dict[str, EstimatorSpec] = {}
# OpenRLHF's and verl's spellings of the same estimators.
ESTIMATOR_ALIASES: dict[str, str] = {}


def register_estimator(name: str, fn: Estimator, needs_critic: bool = True, *, needs_groups: bool = False,
                       kl_in_loss: bool = False, loss_agg_mode: str = "token_mean", beta: float | None = None,
                       aliases: tuple[str, ...] = ()) -> None:
    """Register ``fn`` as ``advantage_estimator: name`` (and under ``aliases``) with its spec."""
    ESTIMATORS[name] = EstimatorSpec(fn, needs_critic, needs_groups, kl_in_loss, loss_agg_mode, beta)
    ESTIMATOR_ALIASES.update({alias: name for alias in aliases})


def estimate(name: str, inputs: AdvantageInputs, params: AdvantageParams) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages, returns)`` of the registered estimator ``name``."""
    if name not in ESTIMATORS:
        raise KeyError(f"unknown advantage estimator {name!r}; registered: {', '.join(sorted(ESTIMATORS))}")
    return ESTIMATORS[name].fn(inputs, params)


def gae(inputs: AdvantageInputs, params: AdvantageParams) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over the critic's values (Schulman et al. 2016), then optional whitening over the batch
    (as in Ziegler et al. 2019 and TRL's classic PPOTrainer); returns are GAE's, unwhitened."""
    if inputs.values is None:
        raise ValueError("the gae estimator needs critic values")
    advantages, returns = compute_gae(inputs.rewards, inputs.values, inputs.mask, params.gamma, params.lam)
    if params.whiten and inputs.mask.sum() > 1:
        advantages = masked_whiten(advantages, inputs.mask)
    return advantages, returns


register_estimator("gae", gae, needs_critic=True)


# Critic-free estimators. Each sample's return is the sum of its shaped rewards: its score, plus
# the KL penalty when the KL sits in the reward (RLOO, REINFORCE++) rather than in the loss (GRPO).


def group_baseline(returns: torch.Tensor, group_ids: torch.Tensor, valid: torch.Tensor, leave_one_out: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample, over the *valid* samples of its group: ``(baseline, std, usable)``, (B,) each.

    ``baseline`` is the group mean (or the mean of the others, RLOO's leave-one-out), ``std`` the
    unbiased group std, ``usable`` false for invalid samples and for groups with fewer than two
    valid samples (no baseline can be formed: they contribute nothing). A failed score never
    enters any of these: it is neither a member of the mean nor a 0 dragging it down.
    """
    groups, inverse = torch.unique(group_ids, return_inverse=True)  # (G,), (B,)
    w = valid.to(returns.dtype)
    n = torch.zeros(len(groups), dtype=returns.dtype, device=returns.device).index_add_(0, inverse, w)  # (G,)
    total = torch.zeros_like(n).index_add_(0, inverse, returns * w)
    mean = total / n.clamp(min=1)
    sq = torch.zeros_like(n).index_add_(0, inverse, (returns - mean[inverse]).square() * w)
    std = (sq / (n - 1).clamp(min=1)).sqrt()
    n_i = n[inverse]
    usable = valid.bool() & (n_i >= 2)
    if leave_one_out:  # mean of the other valid members: (sum - r_i) / (n - 1)
        baseline = (total[inverse] - returns) / (n_i - 1).clamp(min=1)
    else:
        baseline = mean[inverse]
    return baseline, std[inverse], usable


def sequence_returns(inputs: AdvantageInputs) -> torch.Tensor:
    """(B,) sum of each sample's shaped rewards over its response tokens."""
    return (inputs.rewards * inputs.mask).sum(1)


def _broadcast(per_sample: torch.Tensor, usable: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (B,) advantage on every response token, 0 where unusable; returns = advantages (no critic)."""
    adv = (per_sample * usable.to(per_sample.dtype))[:, None] * mask
    return adv, adv


def _need_groups(inputs: AdvantageInputs, name: str) -> torch.Tensor:
    if inputs.group_ids is None:
        raise ValueError(f"the {name} estimator needs group ids (num_generations responses per prompt)")
    return inputs.group_ids


def grpo(inputs: AdvantageInputs, params: AdvantageParams) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO, outcome supervision (Shao et al. 2024, DeepSeekMath sec. 4.1.2): ``(r - mean) / (std + eps)``
    over the group's valid samples, the same on every token of a response."""
    r = sequence_returns(inputs)
    baseline, std, usable = group_baseline(r, _need_groups(inputs, "grpo"), inputs.valid_rows())
    return _broadcast((r - baseline) / (std + 1e-4), usable, inputs.mask)


def dr_grpo(inputs: AdvantageInputs, params: AdvantageParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", sec. 3.1): ``r - mean``
    without the std division, which up-weights too-easy and too-hard groups. The other half of
    the fix, no per-response length normalisation, is ``loss_agg_mode: seq_mean_token_sum_norm``."""
    r = sequence_returns(inputs)
    baseline, _, usable = group_baseline(r, _need_groups(inputs, "dr_grpo"), inputs.valid_rows())
    return _broadcast(r - baseline, usable, inputs.mask)


def rloo(inputs: AdvantageInputs, params: AdvantageParams) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO (Ahmadian et al. 2024, "Back to Basics", eq. 5; Kool et al. 2019): each sample's
    baseline is the mean return of the *other* valid samples of its group."""
    r = sequence_returns(inputs)
    baseline, _, usable = group_baseline(r, _need_groups(inputs, "rloo"), inputs.valid_rows(), leave_one_out=True)
    return _broadcast(r - baseline, usable, inputs.mask)


def _reinforce_pp(inputs: AdvantageInputs, scores: torch.Tensor, usable: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token returns G_t = sum_{s>=t} gamma^(s-t) r_s of the per-token KL penalty with ``scores``
    at the last token, whitened over the batch's valid tokens (REINFORCE++'s global normalisation)."""
    mask = inputs.mask * usable.to(inputs.mask.dtype)[:, None]
    last = (inputs.mask.cumsum(1) == inputs.mask.sum(1, keepdim=True)) & (inputs.mask > 0)  # (B, R) last real token
    kl_part = inputs.rewards - inputs.scores[:, None] * last  # the shaped rewards without the score
    token_rewards = (kl_part + scores[:, None] * last) * mask
    returns = token_rewards.flip(1).cumsum(1).flip(1)  # gamma = 1: the reward-to-go
    if mask.sum() > 1:
        returns = masked_whiten(returns, mask)
    return returns * mask, returns * mask


def reinforce_pp(inputs: AdvantageInputs, params: AdvantageParams) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025, sec. 3): token-level KL in the reward, no critic, no group baseline;
    advantages are the reward-to-go normalised over the whole batch."""
    valid = inputs.valid_rows()
    return _reinforce_pp(inputs, inputs.scores, valid)


def reinforce_pp_baseline(inputs: AdvantageInputs, params: AdvantageParams) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++-baseline (Hu 2025, sec. 3.3): subtract the group's mean score from each score
    first (over valid samples), then REINFORCE++ with global normalisation."""
    baseline, _, usable = group_baseline(inputs.scores, _need_groups(inputs, "reinforce_pp_baseline"),
                                         inputs.valid_rows())
    return _reinforce_pp(inputs, inputs.scores - baseline, usable)


register_estimator("grpo", grpo, needs_critic=False, needs_groups=True, kl_in_loss=True, aliases=("group_norm",))
# Dr. GRPO's other half: no per-response length normalisation in the loss (Liu et al. 2025 sec. 3.1).
register_estimator("dr_grpo", dr_grpo, needs_critic=False, needs_groups=True, kl_in_loss=True,
                   loss_agg_mode="seq_mean_token_sum_norm", aliases=("drgrpo",))
register_estimator("rloo", rloo, needs_critic=False, needs_groups=True)
register_estimator("reinforce_pp", reinforce_pp, needs_critic=False,
                   aliases=("reinforce", "reinforce_plus_plus", "reinforce++"))
register_estimator("reinforce_pp_baseline", reinforce_pp_baseline, needs_critic=False, needs_groups=True,
                   aliases=("reinforce_baseline", "reinforce_plus_plus_baseline", "reinforce++_baseline"))


def group_stats(scores: torch.Tensor, group_ids: torch.Tensor, valid: torch.Tensor
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Group health of a batch and the samples of zero-std groups.

    Returns metrics (mean within-group reward std, share of groups whose valid rewards are all
    equal, i.e. no learning signal, and share of groups with fewer than two valid samples) and a
    (B,) bool marking members of zero-std groups (DAPO's dynamic-sampling filter, Yu et al. 2025
    sec. 3.2, without the resampling)."""
    groups, inverse = torch.unique(group_ids, return_inverse=True)  # (G,), (B,)
    _, std, usable = group_baseline(scores, group_ids, valid)
    g_std = torch.zeros(len(groups), dtype=std.dtype, device=std.device).scatter_(0, inverse, std)  # (G,)
    g_ok = torch.zeros(len(groups), dtype=torch.bool, device=std.device).index_fill_(0, inverse[usable], True)
    g_zero = g_ok & (g_std < 1e-6)
    metrics = {
        "group/reward_std": g_std[g_ok].mean() if g_ok.any() else torch.tensor(float("nan")),
        "group/zero_std_frac": g_zero.float().mean(),
        "group/too_few_valid_frac": (~g_ok).float().mean(),
    }
    return metrics, g_zero[inverse]
