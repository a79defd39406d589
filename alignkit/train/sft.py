"""Supervised fine-tuning: next-token loss on assistant tokens only.

Reads top to bottom: load → tokenize → (resume) → steps × micro-batches → log/eval/save → export.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from alignkit.config import SFTConfig
from alignkit.data.collators import SFTCollator
from alignkit.data.encode import IGNORE_INDEX as IGNORE
from alignkit.data.encode import encode_supervised_examples
from alignkit.data.loader import load_examples, split_train_val
from alignkit.data.templates import get_template
from alignkit.models.loading import count_parameters, load_for_training
from alignkit.train.checkpoint import save_checkpoint
from alignkit.train.common import (
    build_optimizer,
    global_batch_indices,
    rank_rng_states,
    restore_model,
    resume,
    save_model,
    setup_run,
    total_steps,
)
from alignkit.train.tracking import MetricLogger, plot_metrics

logger = logging.getLogger(__name__)


def tokenize(cfg: SFTConfig, tokenizer, examples) -> list[dict[str, list[int]]]:
    template = get_template(cfg.template, tokenizer)
    feats = encode_supervised_examples(tokenizer, template, examples, cfg.cutoff_len, cfg.default_system,
                                       cfg.enable_thinking)
    if examples and not feats:
        raise ValueError(f"dataset {cfg.dataset}: no example has a supervised token left after cutoff_len={cfg.cutoff_len}")
    return feats


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over supervised positions."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    labels = batch["labels"][:, 1:]  # (B, T-1): token t is predicted from position t-1
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")


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


def run(cfg: SFTConfig) -> Path:
    # 1. Run setup: accelerator, seeds, output dir, model and data.
    accelerator, out = setup_run(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    model, tokenizer = load_for_training(cfg)
    trainable, total = count_parameters(model)
    logger.info("trainable parameters: %d / %d (%.2f%%)", trainable, total, 100 * trainable / total)
    examples = load_examples(cfg.dataset, cfg.dataset_dir, "sft", cfg.max_samples, cfg.skip_bad_rows)
    train_ex, val_ex = split_train_val(examples, cfg.val_size, cfg.seed)
    train, val = tokenize(cfg, tokenizer, train_ex), tokenize(cfg, tokenizer, val_ex) if val_ex else []
    collate = SFTCollator(tokenizer.pad_token_id)

    # 2. Sizes. A global batch spans all ranks and accumulation steps.
    micro_bs, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    global_bs = micro_bs * accum * world
    if len(train) < global_bs:
        raise ValueError(f"{len(train)} training examples cannot fill one global batch of {global_bs} "
                         "(per_device_train_batch_size x gradient_accumulation_steps x processes)")
    num_steps = total_steps(cfg, len(train) // global_bs)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(cfg, params, num_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    # 3. Resume: weights, optimizer, scheduler, RNG; the data position is the step itself.
    state = resume(accelerator, out, cfg, lambda ckpt: restore_model(accelerator.unwrap_model(model), ckpt),
                   optimizer, scheduler)
    start = state["step"] if state else 0

    tracker = MetricLogger(out, cfg.report_to, enabled=accelerator.is_main_process, resume_step=start)
    bar = tqdm(total=num_steps, initial=start, desc="sft", disable=not accelerator.is_main_process, dynamic_ncols=True)
    for step in range(start, num_steps):
        t0 = time.perf_counter()
        # 4. This rank's share of the global batch, split into micro-batches.
        idx = global_batch_indices(len(train), step, global_bs, cfg.seed)
        mine = [train[i] for i in idx[rank::world]]
        # Normalise by the supervised tokens of the whole global batch, so the update equals a
        # single-process run of the same global batch (DDP averages gradients over ranks).
        n_tokens = sum(sum(1 for lab in train[i]["labels"][1:] if lab != IGNORE) for i in idx)
        loss_sum = torch.zeros((), device=accelerator.device)
        for m in range(accum):
            batch = {k: v.to(accelerator.device) for k, v in collate(mine[m * micro_bs : (m + 1) * micro_bs]).items()}
            with accelerator.no_sync(model) if m < accum - 1 else nullcontext():
                s = token_loss_sum(model, batch)
                accelerator.backward(s * world / n_tokens)
            loss_sum += s.detach()
        # 5. Clip, step, schedule.
        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = accelerator.reduce(loss_sum, "sum").item() / n_tokens

        # 6. Log, evaluate, checkpoint.
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if done % cfg.logging_steps == 0 or done == num_steps:
            metrics = {"train/loss": loss, "train/learning_rate": scheduler.get_last_lr()[0],
                       "train/epoch": step * global_bs / len(train), "time/step": time.perf_counter() - t0}
            if grad_norm is not None:
                metrics["train/grad_norm"] = float(grad_norm)
            tracker.log(done, metrics)
        if val and cfg.eval_strategy == "steps" and done % (cfg.eval_steps or cfg.save_steps) == 0:
            tracker.log(done, {"eval/loss": evaluate(model, val, collate, cfg.per_device_eval_batch_size, accelerator.device)})
        if done % cfg.save_steps == 0 and done < num_steps:
            rngs = rank_rng_states(accelerator)  # collective; each rank resumes its own dropout stream
            if accelerator.is_main_process:
                save_checkpoint(
                    out, done, lambda d: save_model(accelerator.unwrap_model(model), d, tokenizer),
                    {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng_per_rank": rngs},
                    cfg.save_total_limit,
                )
        accelerator.wait_for_everyone()
    bar.close()

    # 7. Final eval and save.
    if val and cfg.eval_strategy != "no":
        eval_loss = evaluate(model, val, collate, cfg.per_device_eval_batch_size, accelerator.device)
        tracker.log(num_steps, {"eval/loss": eval_loss})
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), out, tokenizer)
        if cfg.plot_loss:
            plot_metrics(out, ["train/loss", "eval/loss"])
    tracker.close()
    accelerator.wait_for_everyone()
    return out
