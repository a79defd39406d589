"""Pieces every stage shares: preflight checks, output dir, seeds, optimizer/scheduler, batch order.
Checkpoints (save, list, prune, resume) are ``alignkit.train.checkpoint``'s."""

from __future__ import annotations

import logging
import math
import os
import random
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list
from transformers import get_scheduler

from alignkit.config import StageConfig, save_config
from alignkit.config_checks import output_dir_problem
from alignkit.data.loader import Example, Kind, load_examples
from alignkit.models.gguf import resolve_model_path
from alignkit.models.loading import check_model_dir
from alignkit.train.checkpoint import output_dir_error, resolve_resume
from alignkit.train.heap import fix_mmap_threshold
from alignkit.train.sharding import FSDP_ENV

logger = logging.getLogger(__name__)


def preflight(cfg: StageConfig, kind: Kind) -> list[Example]:
    """Check every path the run needs and parse its dataset; the parsed examples.

    Every stage calls this first, before ``setup_run`` writes into output_dir and before any
    model loads: a typo in a path or a malformed row then fails in seconds with one paragraph
    naming the key, not minutes later (and without leaving a config file behind that makes the
    rerun refuse a "non-empty" output_dir).
    """
    # A .gguf model is converted once (cached) and its directory used from here on (the Python API
    # path; the CLI converts before calling the stage).
    cfg.model_name_or_path = resolve_model_path(cfg.model_name_or_path)
    _check_model_files(cfg.model_name_or_path, "model_name_or_path", "config.json",
                       "a Hugging Face model directory (an adapter goes in adapter_name_or_path)")
    for path in cfg.adapter_name_or_path or []:
        _check_model_files(path, "adapter_name_or_path", "adapter_config.json",
                           "a peft adapter directory (a full model goes in model_name_or_path)")
    _check_writable(cfg.output_dir)
    resolve_resume(cfg.output_dir, cfg.resume_from_checkpoint)  # raises if the checkpoint is missing
    api = getattr(cfg, "reward_api", None)
    column = getattr(api, "criteria_column", None) if getattr(cfg, "reward_model_type", None) == "api" else None
    return load_examples(cfg.dataset, cfg.dataset_dir, kind, cfg.max_samples, cfg.skip_bad_rows,
                         keep_columns=(column,) if column else ())


def _check_model_files(path: str, key: str, marker: str, what: str) -> None:
    if not (check_model_dir(path, key) / marker).is_file():
        raise FileNotFoundError(f"{key}: {path!r} has no {marker}, so it is not {what}.")


def _check_writable(output_dir: str) -> None:
    """output_dir, or the nearest existing folder above it (where it will be created), is writable."""
    if problem := output_dir_problem(output_dir):
        raise ValueError(problem)


def setup_run(cfg: StageConfig) -> tuple[Accelerator, Path]:
    """Accelerator, seeds (a different one per rank) and a checked output_dir with the resolved config;
    glibc's mmap threshold fixed (``alignkit.train.heap``: freed activations go back to the OS)."""
    fix_mmap_threshold()
    accelerator = make_accelerator()
    out = Path(cfg.output_dir)
    # Only rank 0 checks and writes output_dir; the others learn its verdict, so a refusal stops
    # every rank instead of leaving them waiting in the first collective.
    error = [None]
    if accelerator.is_main_process:
        error[0] = output_dir_error(cfg, out)
        if error[0] is None:
            save_config(cfg, out)
    if accelerator.num_processes > 1:
        broadcast_object_list(error)
    if error[0] is not None:
        raise FileExistsError(error[0])
    seed = cfg.seed + accelerator.process_index
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return accelerator, out


def make_accelerator() -> Accelerator:
    """The run's Accelerator: what ``accelerate launch`` or ``torchrun`` set up, on GPUs or on CPU."""
    # Under torchrun on a machine without GPUs, Accelerator() would start one independent
    # single-process run per rank (all writing one output_dir); cpu=True makes it use DDP over gloo.
    # cpu=True would also switch DeepSpeed off, so a DeepSpeed launch gets gloo explicitly instead.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    on_cpu = launched and not torch.accelerator.is_available()
    if on_cpu and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    else:
        # FSDP (fsdp.yaml) is applied by alignkit itself (sharding.shard): accelerate's own plugin must
        # stay off, on GPUs as on CPU (where it would silently leave the model unwrapped anyway).
        os.environ[FSDP_ENV], fsdp = "false", os.environ.get(FSDP_ENV, "false")
        try:
            accelerator = Accelerator(cpu=on_cpu)
        finally:
            os.environ[FSDP_ENV] = fsdp
    if launched and accelerator.num_processes == 1:
        raise RuntimeError("launched with WORLD_SIZE > 1, but accelerate set up a single process; "
                           "use `accelerate launch` or `torchrun` with a supported backend")
    return accelerator


def reduce_metrics(accelerator: Accelerator, metrics: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """Mean over ranks of each metric, ignoring ranks where it is NaN/inf (one collective).

    Every rank must pass the same keys, or the collectives would not line up."""
    keys = sorted(metrics)
    v = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float32).detach().cpu().reshape(()) for k in keys])
    ok = torch.isfinite(v)
    both = torch.stack([torch.where(ok, v, torch.zeros_like(v)), ok.float()]).to(accelerator.device)  # (2, K)
    if accelerator.num_processes > 1:
        both = accelerator.reduce(both, "sum")
    mean = (both[0] / both[1]).where(both[1] > 0, torch.full_like(both[0], float("nan")))
    return dict(zip(keys, mean.tolist(), strict=True))


def total_steps(cfg: StageConfig, steps_per_epoch: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.num_train_epochs * steps_per_epoch))


def build_optimizer(cfg: StageConfig, params: list[torch.nn.Parameter], num_steps: int):
    """AdamW (or SGD) with weight decay off for biases/norms, and the configured LR schedule."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.optim == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.learning_rate)
    else:
        optimizer = torch.optim.AdamW(
            groups, lr=cfg.learning_rate, eps=cfg.adam_epsilon, fused=cfg.optim == "adamw_torch_fused"
        )
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * num_steps)
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=num_steps)
    return optimizer, scheduler


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    """The data order of one epoch: a permutation that depends only on (seed, epoch), so a
    resumed run and every rank see the same order without saving it."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def global_batch_indices(n: int, step: int, global_bs: int, seed: int) -> list[int]:
    """Indices of the examples in optimizer step ``step`` (drop-last batching over epochs)."""
    per_epoch = max(1, n // global_bs)
    epoch, pos = divmod(step, per_epoch)
    order = epoch_order(n, epoch, seed)
    return order[pos * global_bs : (pos + 1) * global_bs]
