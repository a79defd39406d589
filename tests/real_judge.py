"""Whether the real-judge tests can run: SmolLM2's GGUF (scripts/setup.sh --real) and a Python with vLLM."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from alignkit.judge.llm import vllm_python
from alignkit.models.gguf import smollm2_gguf


def smollm2_judge() -> tuple[Path | None, str | None]:
    """``(gguf_file, None)``, or ``(file_or_None, why the real judge cannot run)``."""
    try:
        gguf = smollm2_gguf()
    except ModuleNotFoundError as e:
        return None, str(e)
    if not gguf.is_file():
        return gguf, f"{gguf} is missing: run scripts/setup.sh --real"
    if vllm_python() == sys.executable and importlib.util.find_spec("vllm") is None:
        return gguf, "no Python with vLLM (.venv-vllm): run scripts/setup_vllm.sh"
    return gguf, None
