"""Shared fixtures: a tiny real model on disk, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignkit.models.tiny import build_tiny

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def sft_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model's LoRA SFT adapter (examples/sft_tiny.yaml): where PPO-family tests start."""
    from alignkit.config import load_config
    from alignkit.train import sft

    out = tmp_path_factory.mktemp("sft") / "run"
    cfg = load_config(EXAMPLES / "sft_tiny.yaml", [f"model_name_or_path={tiny_model_dir}", f"output_dir={out}",
                                                  f"dataset_dir={EXAMPLES / 'data'}", "report_to=none",
                                                  "plot_loss=false", "eval_strategy=no", "val_size=0"])
    return sft.run(cfg)


def ppo_config(model_dir, adapter, out, *overrides):
    """examples/ppo_tiny.yaml on the tiny model and ``adapter``, quiet, with ``overrides``."""
    from alignkit.config import load_config

    return load_config(EXAMPLES / "ppo_tiny.yaml", [
        f"model_name_or_path={model_dir}", f"adapter_name_or_path={adapter}", f"output_dir={out}",
        f"dataset_dir={EXAMPLES / 'data'}", "report_to=none", "plot_loss=false", *overrides])


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    # Tiny models gain nothing from OpenMP threads, and on a busy 2-core runner two spinning
    # threads per process made steps up to 10x slower (see alignkit.models.tiny.pretrain).
    import torch

    torch.set_num_threads(1)


class CrashAfterCheckpoint(Exception):
    """Stands for a kill right after a checkpoint was written."""


def crash_after_first_checkpoint(run, monkeypatch) -> None:
    """Call ``run()`` and stop it with ``CrashAfterCheckpoint`` as soon as its first checkpoint is
    written (rank 0 writes through ``alignkit.train.checkpoint.write_checkpoint``)."""
    from alignkit.train.checkpoint import write_checkpoint

    def save_then_crash(*args, **kwargs):
        raise CrashAfterCheckpoint(write_checkpoint(*args, **kwargs))

    monkeypatch.setattr("alignkit.train.checkpoint.write_checkpoint", save_then_crash)
    with pytest.raises(CrashAfterCheckpoint):
        run()
    monkeypatch.undo()
