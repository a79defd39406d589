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


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    # Tiny models gain nothing from OpenMP threads, and on a busy 2-core runner two spinning
    # threads per process made steps up to 10x slower (see alignkit.models.tiny.pretrain).
    import torch

    torch.set_num_threads(1)
