"""Checkpoints, in one place: save, list, prune and resume.

A checkpoint is ``output_dir/checkpoint-{step}``: the stage's model files, and ``trainer_state.pt``
(step, optimizer, scheduler, what else the stage keeps, every rank's RNG, the backend), written
last. Under ZeRO it also holds DeepSpeed's per-rank ``shards/``.

Saves are atomic: written to a temporary directory, then renamed into place. A crash mid-save
leaves the previous checkpoint valid; ``list_checkpoints`` only ever sees complete directories (a
rename is atomic on one filesystem). What differs under ZeRO and FSDP (gathering the weights,
DeepSpeed's own shards) is ``sharding``'s; this module decides what is written and read back.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn

from alignkit.config import CONFIG_FILE, StageConfig
from alignkit.train.sharding import backend, full_state, full_weights, is_deepspeed, is_fsdp

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.pt"
SHARDS = "shards"  # a checkpoint's folder of per-rank weight/optimizer shards (DeepSpeed ZeRO runs)


# ---------------------------------------------------------------- list, prune


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete ``checkpoint-N`` dirs (their state file written last), oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and re.fullmatch(rf"{PREFIX}\d+", p.name)]
    found = [p for p in found if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def prune(output_dir: str | Path, keep: int | None) -> None:
    """Delete all but the ``keep`` newest complete checkpoints (``save_total_limit``; None keeps all)."""
    if keep:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def output_dir_error(cfg: StageConfig, out: Path) -> str | None:
    """Why a run may not start in ``out`` (not empty, neither resuming nor overwriting), or None. The
    saved config alone does not count: a run that stopped before its first step (a failed judge
    start-up check, a model that did not load) left nothing to lose, and its re-run must not need
    overwrite_output_dir."""
    resuming = cfg.resume_from_checkpoint not in (None, False)
    kept = [p for p in out.iterdir() if p.name != CONFIG_FILE] if out.is_dir() else []
    if kept and not (resuming or cfg.overwrite_output_dir):
        found = "it holds checkpoints" if list_checkpoints(out) else "it holds no checkpoint yet"
        return (f"output_dir {out} is not empty ({found}): set resume_from_checkpoint=true to continue the run "
                "from its latest checkpoint, overwrite_output_dir=true to start over in it, or choose another output_dir")
    return None


# ---------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_rng_states(accelerator: Accelerator) -> list[dict]:
    """Every rank's RNG state, in rank order (a collective: call it on all ranks)."""
    state = rng_state()
    return gather_object([state]) if accelerator.num_processes > 1 else [state]


def restore_rng(accelerator: Accelerator, state: dict) -> None:
    """Each rank resumes its own RNG stream when the checkpoint has one per rank (same world size)."""
    per_rank = state.get("rng_per_rank") or []
    set_rng_state(per_rank[accelerator.process_index] if len(per_rank) == accelerator.num_processes else state["rng"])


# ---------------------------------------------------------------- save


def write_checkpoint(output_dir: str | Path, step: int, write_model: Callable[[Path], None], state: dict[str, Any],
                     save_total_limit: int | None = None) -> Path:
    """Write ``checkpoint-{step}`` atomically (one process): model files via ``write_model``, then the state."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"{PREFIX}{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{PREFIX}{step}-", dir=out))
    try:
        write_model(tmp)
        torch.save({**state, "step": step, "rng": rng_state()}, tmp / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(out, save_total_limit)
    return final


def save_checkpoint(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, out: Path,
                    step: int, write_model: Callable[[Path], None], state: dict[str, Any], limit: int | None) -> None:
    """Write ``checkpoint-{step}`` of a run (a collective: every rank calls it).

    ``state`` is what else rank 0 stores (scheduler, KL controller, ...). The optimizer state goes
    in it when it is whole on every rank (DDP); under ZeRO every rank writes its shards instead
    (``accelerator.save_state``: DeepSpeed's own checkpoint of weights and optimizer) into a folder
    that rank 0 moves into the checkpoint before the rename that makes it complete; under FSDP
    rank 0 stores the gathered trainable weights and optimizer state (world-size independent)."""
    shards = None
    if is_deepspeed(accelerator):
        shards = out / f".{PREFIX}{step}-{SHARDS}"
        accelerator.save_state(str(shards))
    elif is_fsdp(accelerator):  # whole; ``resume`` hands it to set_state_dict
        weights, optim = full_state(model, optimizer)
        state = {**state, "model": weights, "optimizer": optim}
    else:
        state = {**state, "optimizer": optimizer.state_dict()}
    rngs = rank_rng_states(accelerator)  # collective; each rank resumes its own sampling/dropout stream

    def write(d: Path) -> None:
        write_model(d)
        if shards is not None:
            shards.rename(d / SHARDS)

    with full_weights(accelerator, model):
        if accelerator.is_main_process:
            write_checkpoint(out, step, write, {**state, "rng_per_rank": rngs, "backend": backend(accelerator)}, limit)
    accelerator.wait_for_everyone()
    if shards is not None and accelerator.is_main_process:
        shutil.rmtree(shards, ignore_errors=True)  # left only if rank 0's write failed


# ---------------------------------------------------------------- resume


def resolve_resume(output_dir: str | Path, resume: str | bool | None) -> Path | None:
    """``true`` → latest checkpoint in output_dir (error if none); a path → that checkpoint."""
    if resume in (None, False):
        return None
    if resume is True or resume == "true":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"resume_from_checkpoint: true, but {output_dir} has no complete checkpoint")
        return found[-1]
    path = Path(str(resume))
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"resume_from_checkpoint: {path} is not a complete checkpoint (no {STATE_FILE})")
    return path


def load_state(ckpt: Path) -> dict[str, Any]:
    # weights_only=False: the state holds Python RNG tuples and numpy arrays we wrote ourselves.
    return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)


def resume(accelerator: Accelerator, out: Path, cfg: StageConfig, restore_weights, optimizer, scheduler,
           model: nn.Module | None = None) -> dict | None:
    """Restore a checkpoint named by ``resume_from_checkpoint`` (weights through
    ``restore_weights(ckpt)``, optimizer, scheduler, this rank's RNG); its state, or None.

    A ZeRO checkpoint's weights and optimizer are DeepSpeed's per-rank shards (``accelerator.load_state``
    on every rank); it resumes only under DeepSpeed with the same number of processes. An FSDP
    checkpoint holds the whole trainable weights and optimizer state, which every rank hands to
    torch's ``set_state_dict`` on the sharded ``model``; it resumes only under FSDP."""
    ckpt = resolve_resume(out, cfg.resume_from_checkpoint)
    if ckpt is None:
        return None
    state = load_state(ckpt)
    kind = "zero" if (ckpt / SHARDS).is_dir() else "fsdp" if state.get("backend") == "fsdp" else "plain"
    name = backend(accelerator)
    if kind != ("zero" if name.startswith("zero") else "fsdp" if name == "fsdp" else "plain"):
        raise ValueError(f"resume_from_checkpoint: {ckpt} was written by a {state.get('backend', 'ddp')} run and "
                         f"cannot resume a {name} run; launch with the accelerate config it was "
                         "written with (the final model or a checkpoint's adapter can start a new run instead).")
    if kind == "zero":
        accelerator.load_state(str(ckpt / SHARDS))
    elif kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        restore_weights(ckpt)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(accelerator, state)
    logger.info("resumed from %s at step %d", ckpt, state["step"])
    return state
