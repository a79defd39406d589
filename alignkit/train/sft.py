"""Supervised fine-tuning: next-token loss on assistant tokens only.

Reads top to bottom: check paths and data → load → tokenize → the shared loop (``train.fit.fit``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from alignkit.config import SFTConfig
from alignkit.data.chat_format import ChatFormat
from alignkit.data.collators import SFTCollator
from alignkit.data.encode import IGNORE_INDEX as IGNORE
from alignkit.data.encode import encode_supervised_examples
from alignkit.data.loader import split_train_val
from alignkit.models.architectures import forward_with_aux
from alignkit.models.io import restore_model, save_model
from alignkit.models.loading import build_policy_model, load_tokenizer
from alignkit.train.common import preflight, setup_run
from alignkit.train.fit import Stage, fit

logger = logging.getLogger(__name__)


def tokenize(cfg: SFTConfig, fmt: ChatFormat, examples) -> list[dict]:
    feats = encode_supervised_examples(fmt, examples, cfg.cutoff_len)
    if examples and not feats:
        raise ValueError(f"dataset {cfg.dataset}: no example has a supervised token left after cutoff_len={cfg.cutoff_len}")
    return feats


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over supervised positions."""
    logits = model(**model_inputs(batch)).logits  # (B, T, V)
    return cross_entropy_sum(logits, batch["labels"])


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The forward's kwargs: ids and mask, plus a VL batch's pixel inputs (SFTCollator makes them)."""
    return {k: v for k, v in batch.items() if k != "labels"}


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) labels -> summed cross-entropy; token t is predicted from position t-1."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE,
                           reduction="sum")


def train_loss_sum(model, batch: dict[str, torch.Tensor], aux_coef: float) -> tuple[torch.Tensor, dict]:
    """``token_loss_sum`` plus, on a MoE model with ``moe_aux_loss_coef > 0``, the router's
    load-balancing loss. That loss is a micro-batch mean; weighting it by the micro-batch's supervised
    tokens makes ``fit``'s division by the global token count average it like the token loss."""
    logits, aux = forward_with_aux(model, aux_coef, **model_inputs(batch))
    loss = cross_entropy_sum(logits, batch["labels"])
    if aux is None:
        return loss, {}
    n = (batch["labels"][:, 1:] != IGNORE).sum()
    return loss + aux * n, {"aux_loss": aux.detach() * n}


@torch.no_grad()
def evaluate(model, feats, collate, batch_size: int, device) -> float:
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(feats), batch_size):
        chunk = feats[i : i + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk).items()}
        total += token_loss_sum(model, batch).item()
        n += int((batch["labels"][:, 1:] != IGNORE).sum())
    model.train()
    return total / max(n, 1)


def supervised_tokens(rows: list[dict]) -> int:
    """Positions with a label, the count the summed loss is averaged over."""
    return sum(sum(1 for lab in row["labels"][1:] if lab != IGNORE) for row in rows)


def run(cfg: SFTConfig) -> Path:
    # 1. Check paths and parse the data before anything is written or loaded.
    examples = preflight(cfg, "sft")
    accelerator, out = setup_run(cfg)

    # 2. Model and tokenized data.
    model, tokenizer = build_policy_model(cfg), load_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code)
    fmt = ChatFormat.for_model(cfg, tokenizer)  # its vision processor is None on a text-only model
    train_ex, val_ex = split_train_val(examples, cfg.val_size, cfg.seed)
    train, val = tokenize(cfg, fmt, train_ex), tokenize(cfg, fmt, val_ex) if val_ex else []
    collate = SFTCollator(tokenizer.pad_token_id, fmt.vision)

    # 3. Train. The loss is averaged over the supervised tokens of the whole global batch.
    def eval_loss(m: nn.Module) -> dict[str, float]:
        return {"eval/loss": evaluate(m, val, collate, cfg.per_device_eval_batch_size, accelerator.device)}

    fit(cfg, accelerator, out, Stage(
        name="sft", model=model, train=train, collate=collate,
        loss_sum=lambda m, batch: train_loss_sum(m, batch, cfg.moe_aux_loss_coef), count=supervised_tokens,
        save=lambda m, d: save_model(m, d, tokenizer), restore=restore_model,
        evaluate=eval_loss if val else None, final_eval=cfg.eval_strategy != "no",
        plotted=["train/loss", "eval/loss"],
    ))
    return out
