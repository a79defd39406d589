"""Atomic checkpoints: written to a temporary directory, then renamed into place.

A crash mid-save leaves the previous checkpoint valid; ``latest_checkpoint`` only ever sees
complete directories (a rename is atomic on one filesystem).
"""

from __future__ import annotations

import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignkit.runs import CHECKPOINT_PREFIX as PREFIX
from alignkit.runs import STATE_FILE, list_checkpoints

SHARDS = "shards"  # a checkpoint's folder of per-rank weight/optimizer shards (DeepSpeed ZeRO runs)


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


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    write_model: Callable[[Path], None],
    state: dict[str, Any],
    save_total_limit: int | None = None,
) -> Path:
    """Write ``checkpoint-{step}`` atomically: model files via ``write_model``, then the state."""
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
    if save_total_limit:
        for old in list_checkpoints(out)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


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
