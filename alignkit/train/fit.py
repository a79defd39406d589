"""The optimisation loop SFT and RM share: sizes → optimizer → (resume) → steps × micro-batches →
log/eval/checkpoint → final eval and save.

A stage brings only what is its own, as a ``Stage``: the model, its tokenized rows, the summed
loss of one micro-batch, what a global batch's loss is averaged over, evaluation and save/restore.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from alignkit.config import StageConfig
from alignkit.train import checkpoint, sharding
from alignkit.train.checkpoint import resume
from alignkit.train.common import build_optimizer, global_batch_indices, total_steps
from alignkit.train.tracking import MetricLogger, plot_metrics

logger = logging.getLogger(__name__)
Batch = dict[str, torch.Tensor]


@dataclass
class Stage:
    """What one training stage plugs into ``fit``."""

    name: str  # progress-bar label: "sft", "rm"
    model: nn.Module  # the module to train, before accelerator.prepare
    train: list[dict]  # tokenized training rows
    collate: Callable[[list[dict]], Batch]  # rows -> a padded micro-batch
    # Summed (not mean) loss of one micro-batch, plus summed extras logged as ``train/<name>``
    # (e.g. {"accuracy": pairs ranked right}); both are divided by ``count`` of the global batch.
    loss_sum: Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    count: Callable[[list[dict]], int]  # global batch rows -> what the sums are averaged over (tokens, pairs)
    save: Callable[[nn.Module, Path], None]  # unwrapped model -> files in a checkpoint or output_dir
    restore: Callable[[nn.Module, Path], None]  # inverse of save, strict (resume)
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None  # None: no held-out rows
    final_eval: bool = True  # evaluate after the last step (when there are held-out rows)
    plotted: list[str] = field(default_factory=list)  # curves drawn with plot_loss


@dataclass
class Sizes:
    """Batch and schedule sizes, derived once from the config and the number of training rows."""

    micro_bs: int  # rows per micro-batch on one rank
    accum: int  # micro-batches per optimizer step
    global_bs: int  # rows per optimizer step over all ranks
    steps_per_epoch: int  # whole global batches in one pass over the training rows (drop-last)
    num_steps: int  # optimizer steps in the run
    eval_every: int  # optimizer steps between in-run evaluations


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters. A model loaded under ZeRO-3's ``zero.Init`` holds empty local
    tensors (each rank keeps its partition elsewhere); DeepSpeed records the real size as ``ds_numel``."""
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return sum(n for n, trains in sizes if trains), sum(n for n, _ in sizes)


def plan(cfg: StageConfig, n_train: int, world: int) -> Sizes:
    """A global batch spans all ranks and accumulation steps; an epoch is whole global batches."""
    micro_bs, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    global_bs = micro_bs * accum * world
    if n_train < global_bs:
        raise ValueError(partial_batch_message(n_train, micro_bs, accum, world))
    steps_per_epoch = n_train // global_bs
    eval_every = (cfg.eval_steps or cfg.save_steps) if cfg.eval_strategy == "steps" else steps_per_epoch
    return Sizes(micro_bs, accum, global_bs, steps_per_epoch, total_steps(cfg, steps_per_epoch), eval_every)


def partial_batch_message(n_train: int, micro_bs: int, accum: int, world: int) -> str:
    """Why a dataset smaller than one global batch is refused, and the setting that makes it fit."""
    fits = n_train // (micro_bs * world)
    fix = (f"set gradient_accumulation_steps: {fits}" if fits >= 1 else
           f"set per_device_train_batch_size: {n_train // world} and gradient_accumulation_steps: 1"
           if n_train >= world else "run on fewer processes")
    return (f"{n_train} training examples cannot fill one global batch of {micro_bs * accum * world} "
            f"(per_device_train_batch_size {micro_bs} x gradient_accumulation_steps {accum} x {world} processes). "
            "LLaMA-Factory would run one partial batch; alignkit's steps are whole global batches, so every "
            "step averages its loss over the same number of rows and a resumed run sees the same batches. "
            f"To train on these {n_train} examples, {fix} (or add data).")


def fit(cfg: StageConfig, accelerator: Accelerator, out: Path, stage: Stage) -> dict[str, float] | None:
    """Train ``stage.model`` and save it to ``out``; the final evaluation's results, if any."""
    # 1. Sizes, optimizer, scheduler.
    trainable, total = count_parameters(stage.model)
    logger.info("trainable parameters: %d / %d (%.2f%%)", trainable, total, 100 * trainable / total)
    sizes = plan(cfg, len(stage.train), accelerator.num_processes)
    sharding.check_supported(accelerator)
    sharding.shard(accelerator, stage.model)  # FSDP: before the optimizer, which must hold the shards
    params = [p for p in stage.model.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(cfg, params, sizes.num_steps)
    sharding.configure(accelerator, sizes.micro_bs, sizes.accum, cfg.max_grad_norm)
    model, optimizer = sharding.prepare(accelerator, stage.model, optimizer)
    model.train()

    # 2. Resume: weights, optimizer, scheduler, RNG; the data position is the step itself.
    state = resume(accelerator, out, cfg, lambda ckpt: stage.restore(accelerator.unwrap_model(model), ckpt),
                   optimizer, scheduler, model)
    start = state["step"] if state else 0

    tracker = MetricLogger(out, cfg.report_to, enabled=accelerator.is_main_process, resume_step=start,
                           total_steps=sizes.num_steps)
    bar = tqdm(total=sizes.num_steps, initial=start, desc=stage.name, disable=not accelerator.is_main_process,
               dynamic_ncols=True)
    for step in range(start, sizes.num_steps):
        t0 = time.perf_counter()
        # 3. Forward/backward over this rank's micro-batches, then clip, step, schedule.
        means = accumulate(accelerator, model, stage, step, sizes, cfg.seed)
        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # 4. Log, evaluate, checkpoint.
        done, lr = step + 1, scheduler.get_last_lr()[0]
        bar.update(1)
        bar.set_postfix({k: f"{v:.4f}" for k, v in means.items()} | {"lr": f"{lr:.2e}"})
        if done % cfg.logging_steps == 0 or done == sizes.num_steps:
            metrics = {f"train/{k}": v for k, v in means.items()}
            # The epoch reached after this step, as Hugging Face's Trainer logs it (the last step of a
            # run of num_train_epochs logs num_train_epochs); an epoch is whole global batches.
            metrics |= {"train/learning_rate": lr, "train/epoch": done / sizes.steps_per_epoch,
                        "time/step": time.perf_counter() - t0}
            if grad_norm is not None:
                metrics["train/grad_norm"] = sharding.grad_norm_value(grad_norm)
            tracker.log(done, metrics)
        if stage.evaluate and cfg.eval_strategy != "no" and done % sizes.eval_every == 0 and done < sizes.num_steps:
            tracker.log(done, stage.evaluate(model))
        if done % cfg.save_steps == 0 and done < sizes.num_steps:
            checkpoint.save_checkpoint(accelerator, model, optimizer, out, done,
                                       lambda d: stage.save(accelerator.unwrap_model(model), d),
                                       {"scheduler": scheduler.state_dict()}, cfg.save_total_limit)
        accelerator.wait_for_everyone()
    bar.close()

    # 5. Final evaluation and save.
    results = stage.evaluate(model) if stage.evaluate and stage.final_eval else None
    if results is not None:
        tracker.log(sizes.num_steps, results)
    with sharding.full_weights(accelerator, model):  # ZeRO-3, FSDP: the trained weights, whole, for rank 0
        if accelerator.is_main_process:
            stage.save(accelerator.unwrap_model(model), out)
    if accelerator.is_main_process and cfg.plot_loss:
        plot_metrics(out, stage.plotted)
    tracker.close()
    accelerator.wait_for_everyone()
    return results


def accumulate(accelerator: Accelerator, model: nn.Module, stage: Stage, step: int, sizes: Sizes,
               seed: int) -> dict[str, float]:
    """Backward over this rank's share of global batch ``step``; the batch's mean loss and extras.

    Each micro-batch's summed loss is divided by the whole global batch's count (times the world
    size, since DDP and ZeRO average gradients over ranks), so the update equals that of one process
    on the same global batch, however it is split into ranks and micro-batches. Under DeepSpeed the
    last backward also steps the optimizer (``sharding.backward``).
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    idx = global_batch_indices(len(stage.train), step, sizes.global_bs, seed)
    mine = [stage.train[i] for i in idx[rank::world]]
    count = stage.count([stage.train[i] for i in idx])
    sums: dict[str, torch.Tensor] = {}
    for m in range(sizes.accum):
        rows = mine[m * sizes.micro_bs : (m + 1) * sizes.micro_bs]
        batch = {k: v.to(accelerator.device) for k, v in stage.collate(rows).items()}
        # Gradients are all-reduced once, after the last micro-batch.
        last = m == sizes.accum - 1
        with nullcontext() if last else accelerator.no_sync(model):
            loss, extras = stage.loss_sum(model, batch)
            sharding.backward(accelerator, model, loss * world / count, last)
        for k, v in {"loss": loss, **extras}.items():
            sums[k] = sums.get(k, torch.zeros((), device=accelerator.device)) + v.detach()
    return {k: accelerator.reduce(v, "sum").item() / count for k, v in sums.items()}
