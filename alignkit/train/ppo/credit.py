"""Credit assignment, the learner's first phases: shape the rewards, filter, estimate advantages.

Shaping (Ziegler et al. 2019): the per-token reward is ``-kl_coef * KL`` with the sequence score
added at the last token. Failed scores never enter: their samples are masked out (``Experience.mask``)
and their placeholder scores zeroed before anything reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.algos import RunningMoments, masked_whiten, overlong_penalty, postprocess_scores, shape_rewards
from alignkit.algos.advantages import AdvantageInputs, AdvantageParams, estimate, group_stats
from alignkit.algos.shaping import repeated_ngram_frac, repetition_penalty
from alignkit.train.ppo.experience import Experience


@dataclass(frozen=True)
class ShapingSettings:
    missing_eos_penalty: float | None
    score_clip: float | None
    whiten_rewards: bool  # ppo_whiten_rewards: whiten shaped rewards before the estimator
    overlong: tuple[int, int, float] | None = None  # (max_new_tokens, buffer_len, factor): DAPO's soft penalty
    repetition: tuple[int, float, float] | None = None  # (ngram, threshold, factor): score_repetition_penalty


@dataclass(frozen=True)
class FilterSettings:
    """Which valid samples a critic-free run leaves out of the loss (each counted)."""

    grouped: bool = False  # num_generations > 1: report group statistics
    zero_std_groups: bool = False  # DAPO dynamic sampling without the resampling
    truncated: bool = False  # mask_truncated_completions: responses without EOS


@dataclass
class Shaped:
    scores: torch.Tensor  # (B,) post-processed scores, 0 where invalid
    rewards: torch.Tensor  # (B, R) per-token rewards the estimator reads
    non_score: torch.Tensor  # (B, R) the KL part of the rewards


def shape(exp: Experience, s: ShapingSettings, kl_coef: float, moments: RunningMoments | None) -> Shaped:
    """Post-process valid scores (EOS penalty, running normalisation, clipping) and build rewards."""
    scores = exp.scores.clone()
    if s.overlong is not None:
        max_len, buffer_len, factor = s.overlong
        scores = scores + overlong_penalty(exp.response_mask.sum(1), max_len, buffer_len, factor)
    if s.repetition is not None:
        n, threshold, factor = s.repetition
        share = repeated_ngram_frac(exp.input_ids[:, exp.query_len :], exp.response_mask, n).to(scores.device)
        scores = scores + repetition_penalty(share, threshold, factor)
    ok = exp.valid.bool()
    if ok.any():
        scores[ok] = postprocess_scores(scores[ok], exp.no_eos[ok], s.missing_eos_penalty, s.score_clip, moments)
    scores = scores * exp.valid
    rewards, non_score = shape_rewards(scores, exp.kl, exp.response_mask, kl_coef)
    if s.whiten_rewards:
        rewards = masked_whiten(rewards, exp.mask, shift_mean=False)
    return Shaped(scores, rewards, non_score)


def advantages(exp: Experience, shaped: Shaped, estimator: str, params: AdvantageParams
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages, returns)``, (B, R), from the configured estimator of the registry. Baselines
    see every validly scored sample, including those a filter keeps out of the loss."""
    inputs = AdvantageInputs(rewards=shaped.rewards, scores=shaped.scores, mask=exp.scored_mask, values=exp.values,
                             group_ids=exp.group_ids, valid=exp.valid.bool())
    adv, returns = estimate(estimator, inputs, params)
    return adv * exp.mask, returns


def apply_filters(exp: Experience, shaped: Shaped, f: FilterSettings) -> dict[str, torch.Tensor]:
    """Set ``exp.keep`` from the filters; group metrics and the share of samples out of the loss."""
    metrics: dict[str, torch.Tensor] = {}
    keep = torch.ones_like(exp.valid)
    if f.grouped:
        metrics, zero_std = group_stats(shaped.scores, exp.group_ids, exp.valid.bool())
    if f.zero_std_groups:
        keep = keep * ~zero_std
    if f.truncated:
        keep = keep * ~exp.no_eos
    if not (f.grouped or f.zero_std_groups or f.truncated):
        return metrics  # plain PPO: nothing filtered, nothing new to report
    exp.keep = keep
    metrics["rollout/masked_frac"] = 1 - (exp.valid * keep).mean()
    return metrics
