"""Per-step metrics of a PPO step, named as in DESIGN.md (TensorBoard, JSONL, plots)."""

from __future__ import annotations

import torch

from alignkit.algos import masked_mean
from alignkit.train.ppo.experience import Experience
from alignkit.train.ppo.shaping import Shaped

PLOTTED = ["env/reward_mean", "objective/kl", "objective/kl_coef", "ppo/loss/policy", "ppo/loss/value",
           "ppo/loss/total", "rollout/response_len_mean"]


def repeated_ngram_frac(tokens: torch.Tensor, mask: torch.Tensor, n: int = 3) -> torch.Tensor:
    """(B,) share of each response's token n-grams that repeat an earlier one in it: near 0 for
    fluent text, toward 1 for "good good good ..." (a reward-hacking symptom)."""
    out = torch.zeros(tokens.shape[0])
    for b, (row, m) in enumerate(zip(tokens.tolist(), mask.bool().tolist(), strict=True)):
        seq = [t for t, keep in zip(row, m, strict=True) if keep]
        grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
        if grams:
            out[b] = 1 - len(set(grams)) / len(grams)
    return out


def step_metrics(exp: Experience, shaped: Shaped, advantages: torch.Tensor, returns: torch.Tensor) -> dict[str, torch.Tensor]:
    """This rank's metrics of one step; sequence sums are averaged over valid samples.
    The caller reduces them over ranks (the same keys on every rank)."""
    valid, mask = exp.valid, exp.mask
    n_valid = valid.sum().clamp(min=1)
    reward_mean = (exp.scores * valid).sum() / n_valid
    out = {
        "env/reward_mean": reward_mean,
        "env/reward_std": torch.sqrt(((exp.scores - reward_mean) ** 2 * valid).sum() / n_valid),
        "objective/kl": (exp.kl * mask).sum() / n_valid,  # sequence KL, nats
        "objective/entropy": (-exp.logprobs * mask).sum() / n_valid,  # sequence, sampled-token estimate
        "ppo/mean_scores": (shaped.scores * valid).sum() / n_valid,
        "ppo/mean_non_score_reward": (shaped.non_score * mask).sum() / n_valid,
        "ppo/returns/mean": masked_mean(returns, mask),
        "ppo/advantages_mean": masked_mean(advantages, mask),
        "rollout/response_len_mean": exp.response_mask.sum(1).mean(),
        "rollout/response_len_max": exp.response_mask.sum(1).max(),  # the decode loop's length
        "rollout/no_eos_frac": exp.no_eos.float().mean(),
        "rollout/repeat_3gram_frac": repeated_ngram_frac(exp.input_ids[:, exp.query_len :], exp.response_mask).mean(),
    }
    if exp.values is not None:
        out["ppo/val/mean"] = masked_mean(exp.values, mask)
    return out
