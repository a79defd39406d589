"""Reward shaping: turn one score per response into per-token rewards with a KL penalty."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch


def shape_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: ``-kl_coef * KL`` on every response token, score on the last one.

    scores (B,); kl (a ``kl_penalty`` estimate), mask (B, T) with right padding, rows of any
    length >= 1. Returns ``(rewards, non_score_reward)``, each (B, T), zero on padding. The score
    goes on the last real token, not on position T - 1, which is padding for every row shorter
    than the longest (Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO": the
    score belongs to the EOS token). The PPO loop computes KL chunk by chunk during rollout (so
    ``full`` KL never holds the whole batch's logits) and shapes here once the scores arrive.
    """
    mask = mask.to(kl.dtype)
    lengths = mask.sum(1).long()  # (B,)
    if bool((lengths == 0).any()):
        raise ValueError("shape_rewards: every response needs at least one real token in mask")
    non_score_reward = -kl_coef * kl * mask
    rewards = non_score_reward.clone()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, lengths - 1] += scores.to(rewards.dtype)
    return rewards, non_score_reward


class RunningMoments:
    """Running mean and (unbiased) std of every score seen so far, for score normalisation.

    Batches are merged with Chan et al.'s parallel variant of Welford's algorithm, in float64
    Python scalars so the statistics survive a checkpoint exactly.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean
        self.count = 0

    @property
    def std(self) -> float:
        """Unbiased std; 0 until two values have been seen."""
        return math.sqrt(self.m2 / max(self.count - 1, 1))

    def update(self, xs: torch.Tensor) -> None:
        xs = xs.detach().double().flatten()
        n = xs.numel()
        if n == 0:
            return
        batch_mean = xs.mean().item()
        batch_m2 = ((xs - batch_mean) ** 2).sum().item()
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "m2": self.m2, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.m2, self.count = float(state["mean"]), float(state["m2"]), int(state["count"])


def postprocess_scores(
    scores: torch.Tensor,
    no_eos_mask: torch.Tensor,
    missing_eos_penalty: float | None = None,
    score_clip: float | None = None,
    moments: RunningMoments | None = None,
) -> torch.Tensor:
    """Adjust raw scores (B,) before shaping; returns a new (B,) tensor.

    In order: subtract ``missing_eos_penalty`` where ``no_eos_mask`` (B,) is true (a truncated
    response must not score like a finished one; TRL ``missing_eos_penalty``); normalise by
    ``moments`` after adding this batch to them (TRL ``use_score_scaling`` + ``use_score_norm``);
    clip to ±``score_clip``.
    """
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * no_eos_mask.to(scores.dtype)
    if moments is not None:
        moments.update(scores)
        scores = (scores - moments.mean) / (moments.std + torch.finfo(scores.dtype).eps)
    if score_clip is not None:
        scores = scores.clamp(-score_clip, score_clip)
    return scores


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer_len: int, factor: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), (B,) added to the scores.

    0 up to ``max_len - buffer_len`` tokens, then falling linearly to ``-factor`` at ``max_len``
    (and ``-factor`` beyond): long answers lose reward before they are cut off.
    """
    start = max_len - buffer_len
    over = (lengths.to(torch.float32) - start).clamp(min=0) / max(buffer_len, 1)
    return -factor * over.clamp(max=1.0)


def ngram_repeat_share(seq: Sequence[Any], n: int = 3) -> float:
    """Share of the n-grams of ``seq`` (tokens or words) that repeat an earlier one in it: 0 for
    fluent text, toward 1 for "good good good ..." (0 when ``seq`` is shorter than ``n``)."""
    grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def _rows(tokens: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """The kept tokens of each row of ``tokens`` (B, R) under ``mask`` (B, R)."""
    return [[t for t, keep in zip(row, m, strict=True) if keep]
            for row, m in zip(tokens.tolist(), mask.bool().tolist(), strict=True)]


def repeated_ngram_frac(tokens: torch.Tensor, mask: torch.Tensor, n: int = 3) -> torch.Tensor:
    """(B,) ``ngram_repeat_share`` of each response: tokens (B, R), mask (B, R) of response tokens."""
    return torch.tensor([ngram_repeat_share(seq, n) for seq in _rows(tokens, mask)], dtype=torch.float32)


def distinct_ngram_frac(tokens: torch.Tensor, mask: torch.Tensor, n: int = 2) -> float:
    """Distinct-n of a batch (Li et al. 2016): distinct n-grams / all n-grams over every response.
    Low when the responses are alike (mode collapse), whatever each one looks like on its own."""
    grams = [tuple(seq[i : i + n]) for seq in _rows(tokens, mask) for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan


def repetition_penalty(repeat_share: torch.Tensor, threshold: float, factor: float) -> torch.Tensor:
    """(B,) added to the scores: 0 up to ``threshold`` repeated n-gram share, then falling linearly
    to ``-factor`` at a share of 1 (every n-gram a repeat), like DAPO's overlong penalty for length."""
    over = (repeat_share.to(torch.float32) - threshold).clamp(min=0) / max(1.0 - threshold, 1e-6)
    return -factor * over


def pearson_corr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two (N,) tensors; NaN when either is constant or N < 2."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    den = float(x.norm() * y.norm())
    return float((x * y).sum()) / den if den > 0 else math.nan
