"""Kahneman-Tversky optimisation (Ethayarajh et al. 2024) on answers labelled desirable or not.

Reads top to bottom: check paths and rows → policy (and a frozen reference only where one must be
its own copy) → unpaired rows, each with a mismatched answer for the KL estimate → (reference
log-probs once per dataset) → the shared loop (``train.fit.fit``) → ``eval_results.json``.

Rows are LLaMA-Factory's KTO rows (a conversation whose last assistant turn a ``kto_tag`` column
marks desirable or not) or preference pairs, split into a desirable (chosen) and an undesirable
(rejected) answer. The reference and the log-prob helpers are DPO's (``train.dpo``).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from alignkit.algos.preference import implicit_rewards, kto_loss, kto_reference_point
from alignkit.data.chat_format import ChatFormat
from alignkit.data.encode import encode_responses
from alignkit.data.loader import Example
from alignkit.train.dpo import Batch, Recipe, policy_logps, reference_logps, response_logps, run_preference
from alignkit.train.dpo_config import KTOConfig

logger = logging.getLogger(__name__)
PLOTTED = ["train/loss", "train/kl", "train/rewards/chosen", "train/rewards/rejected", "train/logps/chosen",
           "eval/rewards/margins"]


def unpaired(examples: list[Example]) -> list[tuple[Example, str, bool]]:
    """``(prompt, answer, desirable)``: a kto_tag row as it is, a preference pair as two rows."""
    rows = []
    for ex in examples:
        if ex.kto_tag is None:
            rows += [(ex, ex.chosen, True), (ex, ex.rejected, False)]
        else:
            rows.append((replace(ex, messages=ex.messages[:-1]), ex.messages[-1]["content"], ex.kto_tag))
    return rows


def tokenize(cfg: KTOConfig, fmt: ChatFormat, examples: list[Example]) -> list[dict]:
    """``completion_ids`` (prompt + answer), ``kl_ids`` (the same prompt + another row's answer,
    half the dataset away, so pairs split into two rows never meet their own answer: the mismatched
    pairs z0 is estimated on, as LLaMA-Factory builds them), ``prompt_len`` and ``desirable``.
    Rows with images are refused: KTO's half-batch passes (``sub_batch``) do not carry pixels yet."""
    if with_images := next((ex for ex in examples if ex.images), None):
        raise ValueError(f"{with_images.source}: kto does not take image rows yet (sft, rm, dpo and ppo do); "
                         "drop the 'images' column from the dataset's entry in dataset_info.json.")
    rows = unpaired(examples)
    feats = []
    for i, (prompt, answer, desirable) in enumerate(rows):
        other = rows[(i + len(rows) // 2) % len(rows)][1]
        ids, (own, mismatched) = encode_responses(fmt, prompt, [answer, other], cfg.cutoff_len)
        feats.append({"completion_ids": ids + own, "kl_ids": ids + mismatched, "prompt_len": len(ids),
                      "desirable": desirable})
    n_good = sum(f["desirable"] for f in feats)
    logger.info("%d desirable and %d undesirable answers", n_good, len(feats) - n_good)
    return feats


def sub_batch(batch: Batch, index: int) -> Batch:
    """The completions (``index`` 0) or the mismatched KL sequences (1) of a collated KTO batch."""
    b = batch["prompt_len"].shape[0]
    return {"input_ids": batch["input_ids"][index * b : (index + 1) * b], "prompt_len": batch["prompt_len"],
            "attention_mask": batch["attention_mask"][index * b : (index + 1) * b]}


def kto_metrics(beta: float, logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
                z0: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's KTO metrics as micro-batch means times the micro-batch size (``fit`` divides the sums
    by the global batch's row count): ``rewards/chosen`` is over desirable rows, ``/rejected`` over
    undesirable ones, ``kl`` is z0."""
    rewards, n = implicit_rewards(logps, ref_logps, beta), len(logps)

    def scaled_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return values[mask].mean() * n if mask.any() else values.new_zeros(())

    chosen, rejected = scaled_mean(rewards, desirable), scaled_mean(rewards, ~desirable)
    return {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
            "logps/chosen": scaled_mean(logps.detach(), desirable), "logps/rejected": scaled_mean(logps.detach(), ~desirable),
            "kl": z0 * n}


def kto_loss_sum(cfg: KTOConfig, frozen: nn.Module | None, model: nn.Module, batch: Batch
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed KTO loss of a micro-batch of unpaired rows, and TRL's metrics."""
    # 1. Reference log-probs of the answers and the mismatched answers: precomputed, or one no-grad
    # (2B, T) pass, first, so its temporaries are freed before the policy pass holds its activations.
    if "ref_logps" in batch:
        ref_logps, ref_kl_logps = batch["ref_logps"], batch["ref_kl_logps"]
    else:
        ref_logps, ref_kl_logps = reference_logps(model, frozen, batch)[0].chunk(2)
    # 2. Policy log-probs of the mismatched answers (without grad: z0 is a constant), then of the answers.
    with torch.no_grad():
        kl_logps, _ = response_logps(model, sub_batch(batch, 1))
    logps, avg, aux = policy_logps(model, sub_batch(batch, 0), cfg.moe_aux_loss_coef)  # aux: a MoE's router loss
    # 3. The reference point z0, the loss, plus pref_ftx x the desirable answers' mean token NLL.
    z0, desirable = kto_reference_point(kl_logps, ref_kl_logps), batch["desirable"]
    losses = kto_loss(logps, ref_logps, desirable, z0, cfg.pref_beta, cfg.kto_chosen_weight, cfg.kto_rejected_weight)
    losses = losses - cfg.pref_ftx * avg * desirable
    metrics = kto_metrics(cfg.pref_beta, logps, ref_logps, desirable, z0)
    if aux is None:
        return losses.sum(), metrics
    # The router loss is a mean over the answers' tokens; times the micro-batch's rows, fit's division
    # by the global row count averages it like the KTO loss. (The no-grad z0 pass adds none.)
    n = logps.shape[0]
    return losses.sum() + aux * n, {**metrics, "aux_loss": aux.detach() * n}


KTO = Recipe("kto", "kto", tokenize, ("completion", "kl"), ("ref_logps", "ref_kl_logps"), kto_loss_sum, PLOTTED)


def run(cfg: KTOConfig) -> Path:
    """Train KTO on kto_tag rows or on pairs split into desirable and undesirable answers; the output dir."""
    return run_preference(cfg, KTO)
