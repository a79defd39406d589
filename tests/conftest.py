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
