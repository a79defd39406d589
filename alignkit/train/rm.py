"""Reward-model training: a scalar head on the last real token, pairwise (Bradley-Terry) loss.

Reads top to bottom: check paths and pairs → load → tokenize pairs → the shared loop
(``train.fit.fit``: steps, eval, checkpoints, final eval, save) → ``eval_results.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from alignkit.config import RMConfig
from alignkit.data.chat_format import ChatFormat
from alignkit.data.collators import PairCollator
from alignkit.data.encode import encode_pair
from alignkit.data.loader import split_train_val
from alignkit.models.loading import build_policy_model, load_tokenizer, split_adapters
from alignkit.models.reward_model import RewardModel, pairwise_loss, restore_reward_model, save_reward_model
from alignkit.train.common import preflight, setup_run
from alignkit.train.fit import Stage, fit, plan

logger = logging.getLogger(__name__)
EVAL_FILE = "eval_results.json"
PLOTTED = ["train/loss", "train/accuracy", "eval/loss", "eval/accuracy", "eval/margin"]


def tokenize(cfg: RMConfig, fmt: ChatFormat, examples) -> list[dict]:
    """``chosen_ids``/``rejected_ids`` (prompt + response + end-of-turn), the row's margin and images."""
    feats = []
    for ex in examples:
        chosen, rejected = encode_pair(fmt, ex, cfg.cutoff_len)
        # An identical pair has no gradient and can never be ranked right; it only skews accuracy.
        if chosen != rejected:
            feats.append({"chosen_ids": chosen, "rejected_ids": rejected, "margin": ex.margin,
                          **({"images": ex.images} if ex.images else {})})
    if dropped := len(examples) - len(feats):
        logger.warning("dropped %d of %d pairs whose chosen and rejected are identical after cutoff_len=%d",
                       dropped, len(examples), cfg.cutoff_len)
    if not feats:
        raise ValueError(f"dataset {cfg.dataset}: no usable preference pair (chosen and rejected must differ)")
    return feats


def pair_rewards(model, batch: dict[str, torch.Tensor], aux_coef: float = 0.0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(B,) chosen and rejected rewards from one (2B, T) forward (PairCollator pads both to one
    length, and gives a VL batch's pixel inputs for the (2B) rows), and with ``aux_coef > 0`` on a
    MoE the weighted router load-balancing loss of that forward (None otherwise)."""
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    images = {k: batch[k] for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids") if k in batch}
    out = model(ids, mask, aux_coef, **images)
    scores, aux = out if aux_coef > 0 else (out, None)
    return *scores.chunk(2), aux


@torch.no_grad()
def evaluate(model, feats, collate, batch_size: int, device) -> dict[str, float]:
    """Accuracy (share of pairs ranked right), mean margin r_c - r_r, mean scores, mean loss."""
    model.eval()
    r_c, r_r, losses = [], [], []
    for i in range(0, len(feats), batch_size):
        batch = {k: v.to(device) for k, v in collate(feats[i : i + batch_size]).items()}
        c, r, _ = pair_rewards(model, batch)
        r_c.append(c)
        r_r.append(r)
        losses.append(pairwise_loss(c, r, batch.get("margin")))
    model.train()
    c, r = torch.cat(r_c), torch.cat(r_r)
    return {"eval/accuracy": (c > r).float().mean().item(), "eval/margin": (c - r).mean().item(),
            "eval/chosen": c.mean().item(), "eval/rejected": r.mean().item(), "eval/loss": torch.cat(losses).mean().item()}


def run_meta(cfg: RMConfig) -> dict:
    """What scoring needs to format text as in training, recorded in ``reward_model.json``."""
    # The adapters to merge into base_model before this RM's own adapter; a full RM's weights hold them already.
    merged = split_adapters(cfg)[0] if cfg.finetuning_type == "lora" else []
    return {"base_model": cfg.model_name_or_path, "merged_adapters": merged,
            "template": cfg.template, "default_system": cfg.default_system, "enable_thinking": cfg.enable_thinking,
            "cutoff_len": cfg.cutoff_len}


def pair_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], aux_coef: float = 0.0
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed pairwise loss of a micro-batch, and how many of its pairs are ranked right; on a MoE
    with ``moe_aux_loss_coef > 0`` plus the router load-balancing loss, as SFT and DPO add it."""
    r_chosen, r_rejected, aux = pair_rewards(model, batch, aux_coef)
    loss = pairwise_loss(r_chosen, r_rejected, batch.get("margin")).sum()
    metrics = {"accuracy": (r_chosen > r_rejected).sum()}
    if aux is None:
        return loss, metrics
    # The router loss is a mean over the (2B) sequences' tokens; times the B pairs, fit's division by
    # the global pair count averages it like the pairwise loss.
    n = r_chosen.shape[0]
    return loss + aux * n, {**metrics, "aux_loss": aux.detach() * n}


def run(cfg: RMConfig) -> Path:
    # 1. Check paths and parse the pairs before anything is written or loaded.
    examples = preflight(cfg, "pairwise")
    accelerator, out = setup_run(cfg)

    # 2. Reward model (LM + score head) and tokenized pairs.
    rm = RewardModel.from_causal_lm(build_policy_model(cfg))
    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code)
    fmt = ChatFormat.for_model(cfg, tokenizer)  # its vision processor is None on a text-only model
    train_ex, val_ex = split_train_val(examples, cfg.val_size, cfg.seed)
    train, val = tokenize(cfg, fmt, train_ex), tokenize(cfg, fmt, val_ex) if val_ex else []
    collate = PairCollator(tokenizer.pad_token_id, fmt.vision)
    meta = run_meta(cfg)

    # 3. Train. The loss is the mean over the global batch's pairs. The held-out pairs are
    # evaluated at the end whenever there are some: that is what val_size is for.
    def eval_pairs(m: nn.Module) -> dict[str, float]:
        return evaluate(m, val, collate, cfg.per_device_eval_batch_size, accelerator.device)

    results = fit(cfg, accelerator, out, Stage(
        name="rm", model=rm, train=train, collate=collate, count=len,
        loss_sum=lambda m, batch: pair_loss_sum(m, batch, cfg.moe_aux_loss_coef),
        save=lambda m, d: save_reward_model(m, d, tokenizer, meta), restore=restore_reward_model,
        evaluate=eval_pairs if val else None, plotted=PLOTTED,
    ))

    # 4. The final evaluation, for people and for scripts.
    if results is not None and accelerator.is_main_process:
        step = plan(cfg, len(train), accelerator.num_processes).num_steps
        (out / EVAL_FILE).write_text(json.dumps({"step": step, "num_pairs": len(val), **results}, indent=2) + "\n")
        print("eval: " + "  ".join(f"{k.split('/')[1]}={v:.4f}" for k, v in results.items()))
    return out
