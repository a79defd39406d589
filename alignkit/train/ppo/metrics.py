"""Per-step metrics of a PPO step, named as in docs/design.md (TensorBoard, JSONL, plots)."""

from __future__ import annotations

import math

import torch

from alignkit.algos import masked_mean
from alignkit.algos.shaping import distinct_ngram_frac, pearson_corr, repeated_ngram_frac
from alignkit.train.ppo.credit import Shaped
from alignkit.train.ppo.experience import Experience

PLOTTED = ["env/reward_mean", "objective/kl", "objective/kl_coef", "ppo/loss/policy", "ppo/loss/value",
           "ppo/loss/total", "rollout/response_len_mean"]


def step_metrics(exp: Experience, shaped: Shaped, advantages: torch.Tensor, returns: torch.Tensor) -> dict[str, torch.Tensor]:
    """This rank's metrics of one step; sequence sums are averaged over valid samples.
    The caller reduces them over ranks (the same keys on every rank)."""
    valid, mask = exp.valid, exp.mask
    responses, ok = exp.input_ids[:, exp.query_len :], exp.valid.bool()
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
        "rollout/repeat_3gram_frac": repeated_ngram_frac(responses, exp.response_mask).mean(),
        # Hacking detectors (docs/report.md): diversity across the batch, and how far the raw score
        # just follows length (r near 1 for a reward that counts words).
        "rollout/distinct_2": torch.tensor(distinct_ngram_frac(responses, exp.response_mask, 2)),
        "rollout/score_len_corr": torch.tensor(pearson_corr(exp.scores[ok], exp.response_mask.sum(1)[ok])),
    }
    if exp.values is not None:
        out["ppo/val/mean"] = masked_mean(exp.values, mask)
    return out


# Counts of events in a step: a logged row sums them over every step since the last log, so a
# failed judge call on an unlogged step still shows (logging_steps > 1). Everything else is a
# gauge, averaged over those steps.
COUNTERS = frozenset({"reward/failures", "reward/requests", "reward/retries", "reward/cache_hits",
                      "rollout/samples", "rollout/sampling_rounds", "probe/failures",
                      "canary/failures", "judge/prompt_tokens", "judge/completion_tokens", "judge/cost_usd"})


MAXIMA = frozenset({"async/staleness_max"})  # the worst step of the window


class MetricWindow:
    """The steps since the last logged row, reduced to one row when it is logged."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def add(self, metrics: dict[str, float]) -> None:
        self.rows.append(metrics)

    def flush(self) -> dict[str, float]:
        """Counters summed, gauges averaged over their finite values (NaN where none was), and
        ``reward/failure_rate`` = failures / samples over the window."""
        out: dict[str, float] = {}
        for key in dict.fromkeys(k for row in self.rows for k in row):
            values = [row[key] for row in self.rows if key in row]
            finite = [v for v in values if math.isfinite(v)]
            if key in COUNTERS:
                out[key] = float(sum(values))
            elif key in MAXIMA:
                out[key] = max(finite) if finite else math.nan
            else:
                out[key] = sum(finite) / len(finite) if finite else math.nan
        if out.get("rollout/samples"):
            out["reward/failure_rate"] = out.get("reward/failures", 0.0) / out["rollout/samples"]
        self.rows = []
        return out
