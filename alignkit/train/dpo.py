"""Direct preference optimisation on (prompt, chosen, rejected) pairs: DPO, hinge, IPO, ORPO, SimPO.

Reads top to bottom: check paths and pairs → policy (and a frozen reference only where one must
be its own copy) → tokenize pairs → (reference log-probs once per dataset) → the shared loop
(``train.fit.fit``) → ``eval_results.json``.

The reference is, by default, the policy's own weights with its LoRA adapter disabled: every
adapter in ``adapter_name_or_path`` (the SFT model) is merged into the base and a new adapter is
trained on top, exactly as PPO does, so no second model copy is loaded. ORPO and SimPO have no
reference at all and never run a reference pass. The pieces below the stage (collator, log-probs,
reference, evaluation) and the run itself (``run_preference``) are shared with KTO (``train.kto``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from alignkit.algos.logprobs import logprobs_from_logits
from alignkit.algos.preference import (
    dpo_loss,
    hinge_loss,
    implicit_rewards,
    ipo_loss,
    orpo_loss,
    sequence_logps,
    simpo_loss,
)
from alignkit.data.chat_format import ChatFormat
from alignkit.data.encode import encode_responses
from alignkit.data.loader import Kind, split_train_val
from alignkit.data.vision import VisionProcessor, batch_images
from alignkit.models.architectures import forward_with_aux
from alignkit.models.io import restore_model, save_model
from alignkit.models.loading import (
    build_policy_model,
    check_model_dir,
    load_base,
    load_causal_lm,
    load_tokenizer,
    merge_adapters,
    model_dtype,
)
from alignkit.models.reference import adapters_disabled
from alignkit.train import sharding
from alignkit.train.common import preflight, setup_run
from alignkit.train.dpo_config import DPOConfig, PreferenceConfig
from alignkit.train.fit import Stage, fit, plan

logger = logging.getLogger(__name__)
Batch = dict[str, torch.Tensor]
EVAL_FILE = "eval_results.json"
PLOTTED = ["train/loss", "train/rewards/margins", "train/rewards/accuracies", "train/logps/chosen",
           "train/logps/rejected", "eval/rewards/margins", "eval/rewards/accuracies"]


# ---------------------------------------------------------------- batches of sequences


@dataclass
class PreferenceCollator:
    """Rows holding ``<name>_ids`` for each name in ``sequences`` become one right-padded (S*B, T)
    batch, sequence kind by kind (all chosen, then all rejected), so one forward pass reads them all.
    Every other key of a row (``prompt_len``, precomputed reference log-probs, a KTO tag) becomes a
    (B,) tensor, but ``images`` (a row's paths), which become the pixel inputs of all S*B sequences."""

    pad_id: int
    sequences: tuple[str, ...]
    vision: VisionProcessor | None = None

    def __call__(self, rows: list[dict]) -> Batch:
        seqs = [torch.tensor(row[f"{name}_ids"]) for name in self.sequences for row in rows]
        batch = {"input_ids": pad_sequence(seqs, batch_first=True, padding_value=self.pad_id),  # (S*B, T)
                 "attention_mask": pad_sequence([torch.ones_like(s) for s in seqs], batch_first=True)}
        for key in (k for k in rows[0] if not k.endswith("_ids") and k != "images"):
            batch[key] = torch.tensor([row[key] for row in rows])
        images = [row.get("images") or [] for row in rows] * len(self.sequences)
        batch.update(batch_images(self.vision, images, batch["input_ids"]))
        return batch


IMAGE_KEYS = ("pixel_values", "image_grid_thw", "mm_token_type_ids")


def response_mask(batch: Batch) -> torch.Tensor:
    """1 on response tokens: at or after the row's ``prompt_len``, and not padding; (S*B, T)."""
    ids = batch["input_ids"]
    prompt_len = batch["prompt_len"].repeat(ids.shape[0] // batch["prompt_len"].shape[0])  # (S*B,)
    positions = torch.arange(ids.shape[1], device=ids.device)
    return (positions[None] >= prompt_len[:, None]).long() * batch["attention_mask"]


# ---------------------------------------------------------------- log-probs, policy and reference


def response_logps(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed and average log-probs of each sequence's response tokens: (S*B,), (S*B,)."""
    total, avg, _ = policy_logps(model, batch, 0.0)
    return total, avg


def policy_logps(model: nn.Module, batch: Batch, aux_coef: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``response_logps`` and, on a MoE model with ``moe_aux_loss_coef > 0``, the weighted router
    load-balancing loss of the same forward (None otherwise), as SFT adds it."""
    images = {k: batch[k] for k in IMAGE_KEYS if k in batch}  # a VL batch's pixel inputs
    logits, aux = forward_with_aux(model, aux_coef, input_ids=batch["input_ids"],
                                   attention_mask=batch["attention_mask"], use_cache=False, **images)
    token_logps = logprobs_from_logits(logits[:, :-1], batch["input_ids"][:, 1:])  # (N, T-1): t predicts t+1
    mask = response_mask(batch)[:, 1:]
    return sequence_logps(token_logps, mask), sequence_logps(token_logps, mask, average=True), aux


@torch.no_grad()
def reference_logps(policy: nn.Module, frozen: nn.Module | None, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``response_logps`` of the reference, without grad: ``frozen`` when there is one, else the
    policy with its LoRA adapter disabled (the base with the SFT adapters merged)."""
    if frozen is not None:
        return response_logps(frozen, batch)
    lm = getattr(policy, "module", policy)  # DDP wraps the PeftModel; disable_adapter is the PeftModel's
    with adapters_disabled(lm):
        return response_logps(lm, batch)


def build_models(cfg: PreferenceConfig) -> tuple[nn.Module, nn.Module | None]:
    """The policy (every adapter merged, a new LoRA on top) and the reference when it must be its
    own frozen copy (``ref_model``, or full fine-tuning); ``None``: the adapter-disabled policy."""
    policy = build_policy_model(cfg, merge_all=True)
    if not cfg.uses_reference or (cfg.finetuning_type == "lora" and not cfg.ref_model):
        return policy, None
    if cfg.ref_model:
        ref = load_causal_lm(cfg.ref_model, model_dtype(cfg.bf16, cfg.fp16), cfg.trust_remote_code)
        ref = merge_adapters(ref, cfg.ref_model_adapters or [])
    else:
        ref = load_base(cfg)
    return policy, ref.requires_grad_(False).eval()


def prepare_reference(cfg: PreferenceConfig, accelerator: Accelerator, models: tuple[nn.Module, nn.Module | None],
                      rows: list[dict], collate: PreferenceCollator, keys: tuple[str, ...]) -> nn.Module | None:
    """The frozen reference on the run's device, or, with ``precompute_ref_logprobs``, ``None`` after
    storing the reference's log-probs in every row under ``keys`` (one per sequence kind): the
    training steps then run no reference pass and a frozen copy is freed."""
    policy, frozen = models
    device = accelerator.device
    if frozen is not None:
        frozen.to(device)
    if not (cfg.uses_reference and cfg.precompute_ref_logprobs):
        return frozen
    policy.to(device)
    for i in range(0, len(rows), cfg.per_device_eval_batch_size):
        chunk = rows[i : i + cfg.per_device_eval_batch_size]
        total, avg = reference_logps(policy, frozen, {k: v.to(device) for k, v in collate(chunk).items()})
        for key, values in zip(keys, (avg if cfg.length_normalised else total).chunk(len(keys)), strict=True):
            for row, value in zip(chunk, values.tolist(), strict=True):
                row[key] = value
    logger.info("reference log-probs precomputed for %d rows", len(rows))
    return None


# ---------------------------------------------------------------- the DPO loss of one micro-batch


def preference_losses(cfg: DPOConfig, chosen: torch.Tensor, rejected: torch.Tensor,
                      ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None) -> torch.Tensor:
    """``pref_loss`` on (B,) policy and reference log-probs -> (B,) losses."""
    beta = cfg.pref_beta
    match cfg.pref_loss:
        case "sigmoid":
            return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, cfg.dpo_label_smoothing)
        case "hinge":
            return hinge_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
        case "ipo":
            return ipo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
        case "orpo":
            return orpo_loss(chosen, rejected, beta)
        case "simpo":
            return simpo_loss(chosen, rejected, beta, cfg.simpo_gamma)
    raise ValueError(f"pref_loss {cfg.pref_loss!r} has no loss function")


def pair_metrics(beta: float, chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor | None,
                 ref_rejected: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """TRL's metrics, summed over the pairs (``fit`` divides by the global batch's pair count)."""
    r_chosen, r_rejected = implicit_rewards(chosen, ref_chosen, beta), implicit_rewards(rejected, ref_rejected, beta)
    return {"rewards/chosen": r_chosen.sum(), "rewards/rejected": r_rejected.sum(),
            "rewards/accuracies": (r_chosen > r_rejected).float().sum(), "rewards/margins": (r_chosen - r_rejected).sum(),
            "logps/chosen": chosen.detach().sum(), "logps/rejected": rejected.detach().sum()}


def pair_loss_sum(cfg: DPOConfig, frozen: nn.Module | None, model: nn.Module, batch: Batch
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed preference loss of a micro-batch of pairs, and TRL's metrics."""
    # 1. Reference log-probs: precomputed, one no-grad pass, or none at all (ORPO, SimPO). First,
    # so its temporaries are freed before the policy pass holds its activations for backward.
    ref_chosen = ref_rejected = None
    if "ref_chosen_logps" in batch:
        ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    elif cfg.uses_reference:
        ref_total, ref_avg = reference_logps(model, frozen, batch)
        ref_chosen, ref_rejected = (ref_avg if cfg.length_normalised else ref_total).chunk(2)
    # 2. Policy log-probs of chosen and rejected: one (2B, T) forward pass (and a MoE's router loss).
    total, avg, aux = policy_logps(model, batch, cfg.moe_aux_loss_coef)
    chosen, rejected = (avg if cfg.length_normalised else total).chunk(2)
    # 3. The preference loss, plus pref_ftx x the chosen response's mean token NLL (LLaMA-Factory's ftx).
    losses = preference_losses(cfg, chosen, rejected, ref_chosen, ref_rejected) - cfg.pref_ftx * avg.chunk(2)[0]
    metrics = pair_metrics(cfg.pref_beta, chosen, rejected, ref_chosen, ref_rejected)
    if aux is None:
        return losses.sum(), metrics
    # The router loss is a micro-batch mean; times its pairs, fit's division by the global pair count averages it.
    n = chosen.shape[0]
    return losses.sum() + aux * n, {**metrics, "aux_loss": aux.detach() * n}


# ---------------------------------------------------------------- data, evaluation, results


def tokenize(cfg: DPOConfig, fmt: ChatFormat, examples) -> list[dict]:
    """``chosen_ids``/``rejected_ids`` (prompt + response + end-of-turn), ``prompt_len`` and a
    row's ``images`` (paths) when it has some."""
    rows = []
    for ex in examples:
        prompt, (chosen, rejected) = encode_responses(fmt, ex, [ex.chosen, ex.rejected], cfg.cutoff_len)
        if chosen != rejected:  # an identical pair has no gradient and can never be ranked right
            rows.append({"chosen_ids": prompt + chosen, "rejected_ids": prompt + rejected, "prompt_len": len(prompt),
                         **({"images": ex.images} if ex.images else {})})
    if len(rows) < len(examples):
        logger.warning("dataset %s: %d of %d pairs have identical chosen and rejected after cutoff_len=%d; "
                       "they are left out", cfg.dataset, len(examples) - len(rows), len(examples), cfg.cutoff_len)
    if examples and not rows:
        raise ValueError(f"dataset {cfg.dataset}: no usable preference pair (chosen and rejected must differ)")
    return rows


@torch.no_grad()
def evaluate(loss_sum: Callable[[nn.Module, Batch], tuple[torch.Tensor, dict]], model: nn.Module, rows: list[dict],
             collate: PreferenceCollator, batch_size: int, device: torch.device) -> dict[str, float]:
    """Mean loss and metrics over held-out rows, as ``eval/<name>``."""
    model.eval()
    sums: dict[str, float] = {}
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[i : i + batch_size]).items()}
        loss, extras = loss_sum(model, batch)
        for k, v in {"loss": loss, **extras}.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    model.train()
    return {f"eval/{k}": v / len(rows) for k, v in sums.items()}


def check_reference_path(cfg: PreferenceConfig) -> None:
    """A ``ref_model`` (and its adapters) must exist before anything is written or loaded."""
    for path, key in [(cfg.ref_model, "ref_model"), *[(a, "ref_model_adapters") for a in cfg.ref_model_adapters or []]]:
        if path is not None:
            check_model_dir(path, key)


@dataclass(frozen=True)
class Recipe:
    """What DPO and KTO do differently; ``run_preference`` is the rest of either run."""

    name: str  # the stage, as the progress bar shows it
    kind: Kind  # how the dataset's rows are parsed: "pairwise" (DPO) or "kto"
    tokenize: Callable[..., list[dict]]  # (cfg, ChatFormat, examples) -> rows
    sequences: tuple[str, ...]  # each row's ``<name>_ids``, in collated order
    ref_keys: tuple[str, ...]  # where precomputed reference log-probs go, one per sequence kind
    # (cfg, frozen reference or None, model, batch) -> summed loss and summed metrics of a micro-batch
    loss_sum: Callable[[Any, nn.Module | None, nn.Module, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    plotted: list[str]


def run_preference(cfg: PreferenceConfig, recipe: Recipe) -> Path:
    """Train a DPO or KTO run from its config; the output dir."""
    # 1. Check paths and parse the rows before anything is written or loaded.
    examples = preflight(cfg, recipe.kind)
    check_reference_path(cfg)
    accelerator, out = setup_run(cfg)
    sharding.check_supported(accelerator, frozen_reference=cfg.uses_reference and (
        cfg.finetuning_type == "full" or bool(cfg.ref_model)))

    # 2. Policy, reference (its own copy only with ref_model or full fine-tuning), tokenized rows;
    # held-out examples are split off before a pair becomes two KTO rows.
    policy, frozen = build_models(cfg)
    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code)
    fmt = ChatFormat.for_model(cfg, tokenizer)  # its vision processor is None on a text-only model
    train_ex, val_ex = split_train_val(examples, cfg.val_size, cfg.seed)
    train = recipe.tokenize(cfg, fmt, train_ex)
    val = recipe.tokenize(cfg, fmt, val_ex) if val_ex else []
    collate = PreferenceCollator(tokenizer.pad_token_id, recipe.sequences, fmt.vision)

    # 3. Reference log-probs: once for the dataset (precompute_ref_logprobs), or per batch in the loss.
    frozen = prepare_reference(cfg, accelerator, (policy, frozen), train + val, collate, recipe.ref_keys)

    # 4. Train. The loss is the mean over the global batch's rows (pairs for DPO); held-out rows
    # are evaluated at the end whenever there are some.
    def loss_sum(m: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return recipe.loss_sum(cfg, frozen, m, batch)

    def eval_rows(m: nn.Module) -> dict[str, float]:
        return evaluate(loss_sum, m, val, collate, cfg.per_device_eval_batch_size, accelerator.device)

    results = fit(cfg, accelerator, out, Stage(
        name=recipe.name, model=policy, train=train, collate=collate, loss_sum=loss_sum, count=len,
        save=lambda m, d: save_model(m, d, tokenizer), restore=restore_model,
        evaluate=eval_rows if val else None, plotted=recipe.plotted,
    ))

    # 5. The final evaluation, for people (printed) and for scripts (eval_results.json).
    if results is not None and accelerator.is_main_process:
        step = plan(cfg, len(train), accelerator.num_processes).num_steps
        (out / EVAL_FILE).write_text(json.dumps({"step": step, "num_rows": len(val), **results}, indent=2) + "\n")
        print("eval: " + "  ".join(f"{k.removeprefix('eval/')}={v:.4f}" for k, v in results.items()))
    return out


DPO = Recipe("dpo", "pairwise", tokenize, ("chosen", "rejected"), ("ref_chosen_logps", "ref_rejected_logps"),
             pair_loss_sum, PLOTTED)


def run(cfg: DPOConfig) -> Path:
    """Train DPO (or hinge, IPO, ORPO, SimPO: ``pref_loss``) on preference pairs; the output dir."""
    return run_preference(cfg, DPO)
