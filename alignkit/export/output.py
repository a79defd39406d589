"""The export directory: preparing it, the output dtype, training-only extras, the report file."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from alignkit.export.config import DTYPES, ExportConfig
from alignkit.runs import ModelSpec

REPORT_FILE = "export_report.json"
EXTRAS_DIR = "extras"
# Training-only files a run directory may hold next to its policy adapter.
EXTRA_FILES = ("value_head.safetensors",)
EXTRA_DIRS = ("critic_adapter",)
# A vision-language checkpoint's processor settings (image/video resizing, patching), which
# ``AutoImageProcessor``/``AutoProcessor`` and inference engines read from the model directory.
# Not chat_template.json: the export's chat template is the run's, saved with the tokenizer.
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json")


def base_dtype(path: str) -> torch.dtype:
    dtype = getattr(AutoConfig.from_pretrained(path), "dtype", None)
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def finish_report(report: dict[str, Any], cfg: ExportConfig, out: Path, run_vllm: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    report["vllm"] = run_vllm() if cfg.vllm_check else {"status": "skipped: not requested (--vllm-check)"}
    if report["vllm"].get("ok") is False:
        report["passed"] = False
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def prepare_export_dir(out: Path, spec: ModelSpec) -> None:
    """Never write into an input; remove stale weight files a previous export left (a different
    shard count would otherwise leave orphan shards next to the new index)."""
    inputs = {Path(p).resolve() for p in [spec.base, *spec.adapters, spec.run_dir] if p}
    if out.resolve() in inputs:
        raise ValueError(f"export_dir {out} is one of the inputs; choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json", out / REPORT_FILE]:
        stale.unlink(missing_ok=True)


def copy_extras(spec: ModelSpec, out: Path) -> list[str]:
    """The PPO value head (and critic adapter) go to ``extras/``, outside the model weights."""
    src = Path(spec.run_dir or (spec.adapters[-1] if spec.adapters else spec.base))
    copied = []
    for name in EXTRA_FILES:
        if (src / name).is_file():
            (out / EXTRAS_DIR).mkdir(exist_ok=True)
            shutil.copy2(src / name, out / EXTRAS_DIR / name)
            copied.append(f"{EXTRAS_DIR}/{name}")
    for name in EXTRA_DIRS:
        if (src / name).is_dir():
            shutil.copytree(src / name, out / EXTRAS_DIR / name, dirs_exist_ok=True)
            copied.append(f"{EXTRAS_DIR}/{name}/")
    return copied


def copy_processor_files(base: str, out: Path) -> list[str]:
    """Copy the base's processor files (``PROCESSOR_FILES``) into the export: merging rewrites
    the weights and tokenizer only, and a VL export without them cannot preprocess an image."""
    copied = []
    for name in PROCESSOR_FILES:
        if (Path(base) / name).is_file():
            shutil.copy2(Path(base) / name, out / name)
            copied.append(name)
    return copied
