"""The policy update: ``ppo_epochs`` passes over shuffled mini-batches of one Experience.

The configured policy loss of the registry (PPO's clipped one, GSPO, CISPO; aggregated by
``loss_agg_mode``), clipped value loss when
the run has a critic, a KL loss term when the KL sits in the loss (GRPO), optional entropy
bonus, gradient accumulation over micro-batches, gradient clipping. The math is ``alignkit.algos``'.
"""

from __future__ import annotations

import math
import resource
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from alignkit.algos import (
    aggregate_loss,
    entropy_from_logits,
    explained_variance,
    kl_loss_terms,
    logprobs_from_logits,
    masked_mean,
    value_loss,
)
from alignkit.algos.losses import LossInputs, compute_policy_loss
from alignkit.train import sharding
from alignkit.train.ppo.experience import Experience

POLICY_STATS = ("ppo/loss/policy", "ppo/loss/total", "ppo/policy/approxkl", "ppo/policy/clipfrac", "ppo/policy/entropy")
VALUE_STATS = ("ppo/loss/value", "ppo/val/clipfrac", "ppo/val/explained_variance")


@dataclass(frozen=True)
class UpdateSettings:
    ppo_epochs: int
    mini_batch_size: int  # samples per optimizer step (per_device_train_batch_size x accumulation)
    micro_batch_size: int  # samples per forward/backward (per_device_train_batch_size)
    temperature: float  # the sampling temperature: log-probs must be those of the sampling policy
    policy_loss: str  # a registered loss (alignkit.algos.losses)
    cliprange_low: float  # ratio clipped to [1 - cliprange_low, 1 + cliprange_high]
    cliprange_high: float
    cliprange_value: float
    vf_coef: float
    ent_coef: float
    max_grad_norm: float
    loss_agg_mode: str = "token_mean"
    max_len: int | None = None  # seq_mean_token_sum_norm's constant (max_new_tokens)
    kl_loss_coef: float = 0.0  # > 0: beta * KL(policy || ref) is a loss term (GRPO), not a reward penalty
    kl_loss_estimator: str = "k3"

    def stat_keys(self, has_critic: bool) -> tuple[str, ...]:
        """The metric keys an update reports (the same on every rank)."""
        return POLICY_STATS + (VALUE_STATS if has_critic else ()) + (("ppo/loss/kl",) if self.kl_loss_coef > 0 else ())

    def weight(self, mask: torch.Tensor, mb_mask: torch.Tensor) -> torch.Tensor:
        """A micro-batch's share of its mini-batch, so accumulated losses equal the mini-batch's:
        by tokens for ``token_mean``, by responses for the per-sequence modes."""
        if self.loss_agg_mode == "token_mean":
            return mask.sum() / mb_mask.sum().clamp(min=1)
        return (mask.sum(1) > 0).sum() / (mb_mask.sum(1) > 0).sum().clamp(min=1)


@dataclass
class Learner:
    """What an update changes: the prepared model, its optimizer and trainable parameters."""

    accelerator: Accelerator
    model: torch.nn.Module  # the ActorCritic as accelerate prepared it (DDP-wrapped on several ranks)
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]


def trim_padding(attn: torch.Tensor, q: int) -> tuple[slice, slice]:
    """Column slices that drop the padding a micro-batch's rows all share: left padding of the
    query and right padding of the response. Returns (slice of the (b, Q+R) sequence, slice of
    the (b, R) response tensors); rollout batches are padded to their longest row, and a random
    micro-batch of a few rows rarely needs all of it."""
    real = attn.any(0)  # (Q+R,)
    first = min(int(real[:q].long().argmax()) if real[:q].any() else q - 1, q - 1)
    last = max(int(real.nonzero().max()), q)  # keep at least one response column
    return slice(first, last + 1), slice(0, last + 1 - q)


def micro_batch_loss(learner: Learner, s: UpdateSettings, exp: Experience, batch: tuple[torch.Tensor, ...],
                     i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of rows ``i`` (aggregated by ``loss_agg_mode``), their mask, and their stats."""
    advantages, returns = batch
    q = exp.query_len
    cols, rows = trim_padding(exp.attention_mask[i], q)
    ids, qi, mask = exp.input_ids[i][:, cols], q - cols.start, exp.mask[i][:, rows]
    if exp.is_mask is not None:  # masked importance sampling: dropped tokens leave the loss
        mask = mask * exp.is_mask[i][:, rows]
    logits, vpred = learner.model(ids, exp.attention_mask[i][:, cols], qi, exp.pixels_of(i))
    logp = logprobs_from_logits(logits, ids[:, qi:], s.temperature)
    pg_loss, pg_stats = compute_policy_loss(s.policy_loss, LossInputs(
        logp, exp.logprobs[i][:, rows], advantages[i][:, rows], mask, s.cliprange_low, s.cliprange_high,
        s.loss_agg_mode, s.max_len, None if exp.is_weights is None else exp.is_weights[i][:, rows]))
    loss, stats = pg_loss, {"ppo/loss/policy": pg_loss, "ppo/policy/approxkl": pg_stats["approxkl"],
                            "ppo/policy/clipfrac": pg_stats["clipfrac"]}
    if exp.values is not None:
        vpred = vpred.float()
        vf_loss, vf_stats = value_loss(vpred, exp.values[i][:, rows], returns[i][:, rows], mask, s.cliprange_value)
        loss = loss + s.vf_coef * vf_loss
        stats.update({"ppo/loss/value": vf_loss, "ppo/val/clipfrac": vf_stats["clipfrac"],
                      "ppo/val/explained_variance": explained_variance(vpred.detach(), returns[i][:, rows], mask)})
    if s.kl_loss_coef > 0:
        kl = aggregate_loss(kl_loss_terms(logp, exp.ref_logprobs[i][:, rows], s.kl_loss_estimator), mask,
                            s.loss_agg_mode, s.max_len)
        loss = loss + s.kl_loss_coef * kl
        stats["ppo/loss/kl"] = kl
    # One entropy pass (a softmax over the vocabulary): with grad only when it is in the loss.
    entropy = masked_mean(entropy_from_logits(logits if s.ent_coef > 0 else logits.detach(), s.temperature), mask)
    if s.ent_coef > 0:
        loss = loss - s.ent_coef * entropy
    stats.update({"ppo/policy/entropy": entropy, "ppo/loss/total": loss})
    return loss, mask, stats


@torch.no_grad()
def policy_logprobs(learner: Learner, exp: Experience, temperature: float, batch_size: int) -> torch.Tensor:
    """(B, R) log-probs of the current policy on the Experience's responses, ``batch_size`` rows at a
    time: the proximal policy of an off-policy batch (its samples came from an older one)."""
    parts = []
    for m in range(0, exp.input_ids.shape[0], batch_size):
        i = torch.arange(m, min(m + batch_size, exp.input_ids.shape[0]), device=exp.input_ids.device)
        logits, _ = learner.model(exp.input_ids[i], exp.attention_mask[i], exp.query_len, exp.pixels_of(i))
        parts.append(logprobs_from_logits(logits, exp.input_ids[i][:, exp.query_len :], temperature))
    return torch.cat(parts)


def update(learner: Learner, s: UpdateSettings, exp: Experience, advantages: torch.Tensor,
           returns: torch.Tensor) -> dict[str, float]:
    """``ppo_epochs`` passes over shuffled mini-batches; one optimizer step per mini-batch.
    Returns the mean of each stat over micro-batches (NaN where none was finite)."""
    acc = learner.accelerator
    B = exp.input_ids.shape[0]
    # Alone, an all-masked micro-batch can be skipped. Under DDP each backward all-reduces, so every
    # rank runs the same number of them, and under DeepSpeed the last one is the accumulation boundary
    # where the engine steps: an all-masked micro-batch (failed scores) still runs, with a zero loss.
    skippable = acc.num_processes == 1 and not sharding.is_deepspeed(acc)
    sums: dict[str, float] = {}
    n = 0
    for _ in range(s.ppo_epochs):
        perm = torch.randperm(B)
        for start in range(0, B, s.mini_batch_size):
            mb_idx = perm[start : start + s.mini_batch_size]
            mb_mask = exp.mask[mb_idx]
            for m in range(0, len(mb_idx), s.micro_batch_size):
                i = mb_idx[m : m + s.micro_batch_size]
                empty = bool(exp.mask[i].sum() == 0)
                if empty and skippable:
                    continue
                loss, mask, stats = micro_batch_loss(learner, s, exp, (advantages, returns), i)
                last = m + s.micro_batch_size >= len(mb_idx)  # DeepSpeed steps after this one's backward
                sharding.backward(acc, learner.model, loss * s.weight(mask, mb_mask), last)
                if empty:
                    continue
                for k, v in stats.items():
                    if math.isfinite(v := float(v.detach())):
                        sums[k] = sums.get(k, 0.0) + v
                n += 1
            # Under DeepSpeed the engine already clipped and stepped at the boundary (these are no-ops).
            if s.max_grad_norm > 0:
                acc.clip_grad_norm_(learner.params, s.max_grad_norm)
            learner.optimizer.step()
            learner.optimizer.zero_grad(set_to_none=True)
    # The same keys on every rank (NaN where none was finite): metrics are reduced key by key.
    out = {k: sums[k] / max(n, 1) if k in sums else math.nan for k in s.stat_keys(exp.values is not None)}
    out["perf/peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out
