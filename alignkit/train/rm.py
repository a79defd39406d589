"""Reward-model training: a scalar head on the last real token, pairwise (Bradley-Terry) loss.

Reads top to bottom: load → tokenize pairs → (resume) → steps × micro-batches → log/eval/save →
final eval (``eval_results.json``) → save the reward model.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from alignkit.config import RMConfig
from alignkit.data.collators import PairCollator
from alignkit.data.encode import encode_pair
from alignkit.data.loader import load_examples, split_train_val
from alignkit.data.templates import get_template
from alignkit.models.loading import count_parameters, load_for_training
from alignkit.models.reward_model import RewardModel, pairwise_loss, restore_reward_model, save_reward_model
from alignkit.train.checkpoint import save_checkpoint
from alignkit.train.common import (
    build_optimizer,
    global_batch_indices,
    rank_rng_states,
    resume,
    setup_run,
    total_steps,
)
from alignkit.train.tracking import MetricLogger, plot_metrics

logger = logging.getLogger(__name__)
EVAL_FILE = "eval_results.json"
PLOTTED = ["train/loss", "train/accuracy", "eval/loss", "eval/accuracy", "eval/margin"]


def tokenize(cfg: RMConfig, tokenizer, examples) -> list[dict]:
    """``chosen_ids``/``rejected_ids`` (prompt + response + end-of-turn) and the row's margin."""
    template = get_template(cfg.template, tokenizer)
    feats = []
    for ex in examples:
        chosen, rejected = encode_pair(tokenizer, template, ex, cfg.cutoff_len, cfg.default_system, cfg.enable_thinking)
        # An identical pair has no gradient and can never be ranked right; it only skews accuracy.
        if chosen != rejected:
            feats.append({"chosen_ids": chosen, "rejected_ids": rejected, "margin": ex.margin})
    if dropped := len(examples) - len(feats):
        logger.warning("dropped %d of %d pairs whose chosen and rejected are identical after cutoff_len=%d",
                       dropped, len(examples), cfg.cutoff_len)
    if not feats:
        raise ValueError(f"dataset {cfg.dataset}: no usable preference pair (chosen and rejected must differ)")
    return feats


def pair_rewards(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One (2B, T) forward for chosen and rejected together (PairCollator pads both to one length)."""
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    return model(ids, mask).chunk(2)  # (B,), (B,)


@torch.no_grad()
def evaluate(model, feats, collate, batch_size: int, device) -> dict[str, float]:
    """Accuracy (share of pairs ranked right), mean margin r_c - r_r, mean scores, mean loss."""
    model.eval()
    r_c, r_r, losses = [], [], []
    for i in range(0, len(feats), batch_size):
        batch = {k: v.to(device) for k, v in collate(feats[i : i + batch_size]).items()}
        c, r = pair_rewards(model, batch)
        r_c.append(c)
        r_r.append(r)
        losses.append(pairwise_loss(c, r, batch.get("margin")))
    model.train()
    c, r = torch.cat(r_c), torch.cat(r_r)
    return {"eval/accuracy": (c > r).float().mean().item(), "eval/margin": (c - r).mean().item(),
            "eval/chosen": c.mean().item(), "eval/rejected": r.mean().item(), "eval/loss": torch.cat(losses).mean().item()}


def run_meta(cfg: RMConfig) -> dict:
    """What scoring needs to format text as in training, recorded in ``reward_model.json``."""
    adapters = list(cfg.adapter_name_or_path or [])
    return {"base_model": cfg.model_name_or_path, "merged_adapters": adapters[:-1] if cfg.finetuning_type == "lora" else [],
            "template": cfg.template, "default_system": cfg.default_system, "enable_thinking": cfg.enable_thinking,
            "cutoff_len": cfg.cutoff_len}


def run(cfg: RMConfig) -> Path:
    # 1. Run setup: accelerator, seeds, output dir, reward model (LM + score head) and pairs.
    accelerator, out = setup_run(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    lm, tokenizer = load_for_training(cfg)
    rm = RewardModel.from_causal_lm(lm)
    trainable, total = count_parameters(rm)
    logger.info("trainable parameters: %d / %d (%.2f%%)", trainable, total, 100 * trainable / total)
    examples = load_examples(cfg.dataset, cfg.dataset_dir, "pairwise", cfg.max_samples, cfg.skip_bad_rows)
    train_ex, val_ex = split_train_val(examples, cfg.val_size, cfg.seed)
    train, val = tokenize(cfg, tokenizer, train_ex), tokenize(cfg, tokenizer, val_ex) if val_ex else []
    collate = PairCollator(tokenizer.pad_token_id)
    meta = run_meta(cfg)

    # 2. Sizes. A global batch (of pairs) spans all ranks and accumulation steps.
    micro_bs, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    global_bs = micro_bs * accum * world
    if len(train) < global_bs:
        raise ValueError(f"{len(train)} training pairs cannot fill one global batch of {global_bs} "
                         "(per_device_train_batch_size x gradient_accumulation_steps x processes)")
    steps_per_epoch = len(train) // global_bs
    num_steps = total_steps(cfg, steps_per_epoch)
    eval_every = (cfg.eval_steps or cfg.save_steps) if cfg.eval_strategy == "steps" else steps_per_epoch
    params = [p for p in rm.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(cfg, params, num_steps)
    model, optimizer = accelerator.prepare(rm, optimizer)
    model.train()

    # 3. Resume: weights and head, optimizer, scheduler, RNG; the data position is the step itself.
    state = resume(accelerator, out, cfg, lambda ckpt: restore_reward_model(rm, ckpt), optimizer, scheduler)
    start = state["step"] if state else 0

    tracker = MetricLogger(out, cfg.report_to, enabled=accelerator.is_main_process, resume_step=start)
    bar = tqdm(total=num_steps, initial=start, desc="rm", disable=not accelerator.is_main_process, dynamic_ncols=True)
    for step in range(start, num_steps):
        t0 = time.perf_counter()
        # 4. This rank's share of the global batch, split into micro-batches. The loss is the
        # mean over the global batch's pairs (DDP averages gradients over ranks, hence * world).
        idx = global_batch_indices(len(train), step, global_bs, cfg.seed)
        mine = [train[i] for i in idx[rank::world]]
        loss_sum = torch.zeros((), device=accelerator.device)
        correct = torch.zeros((), device=accelerator.device)
        for m in range(accum):
            batch = {k: v.to(accelerator.device) for k, v in collate(mine[m * micro_bs : (m + 1) * micro_bs]).items()}
            with accelerator.no_sync(model) if m < accum - 1 else nullcontext():
                r_chosen, r_rejected = pair_rewards(model, batch)
                s = pairwise_loss(r_chosen, r_rejected, batch.get("margin")).sum()
                accelerator.backward(s * world / global_bs)
            loss_sum += s.detach()
            correct += (r_chosen > r_rejected).sum()
        # 5. Clip, step, schedule.
        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = accelerator.reduce(loss_sum, "sum").item() / global_bs
        acc = accelerator.reduce(correct, "sum").item() / global_bs

        # 6. Log, evaluate, checkpoint.
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.2f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if done % cfg.logging_steps == 0 or done == num_steps:
            metrics = {"train/loss": loss, "train/accuracy": acc, "train/learning_rate": scheduler.get_last_lr()[0],
                       "train/epoch": step * global_bs / len(train), "time/step": time.perf_counter() - t0}
            if grad_norm is not None:
                metrics["train/grad_norm"] = float(grad_norm)
            tracker.log(done, metrics)
        if val and cfg.eval_strategy != "no" and done % eval_every == 0 and done < num_steps:
            tracker.log(done, evaluate(model, val, collate, cfg.per_device_eval_batch_size, accelerator.device))
        if done % cfg.save_steps == 0 and done < num_steps:
            rngs = rank_rng_states(accelerator)  # collective; each rank resumes its own stream
            if accelerator.is_main_process:
                save_checkpoint(
                    out, done, lambda d: save_reward_model(rm, d, tokenizer, meta),
                    {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng_per_rank": rngs},
                    cfg.save_total_limit,
                )
        accelerator.wait_for_everyone()
    bar.close()

    # 7. Final eval on the held-out pairs (whenever there are some: that is what val_size is for) and save.
    if val:
        results = evaluate(model, val, collate, cfg.per_device_eval_batch_size, accelerator.device)
        tracker.log(num_steps, results)
        if accelerator.is_main_process:
            (out / EVAL_FILE).write_text(json.dumps({"step": num_steps, "num_pairs": len(val), **results}, indent=2) + "\n")
            print("eval: " + "  ".join(f"{k.split('/')[1]}={v:.4f}" for k, v in results.items()))
    if accelerator.is_main_process:
        save_reward_model(rm, out, tokenizer, meta)
        if cfg.plot_loss:
            plot_metrics(out, PLOTTED)
    tracker.close()
    accelerator.wait_for_everyone()
    return out
