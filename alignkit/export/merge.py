"""Export a policy (SFT/PPO, LoRA or full): merge adapters into the base, save, verify."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer

from alignkit.data.templates import get_template
from alignkit.export.config import DTYPES, ExportConfig
from alignkit.export.output import (
    base_dtype,
    copy_extras,
    copy_processor_files,
    finish_report,
    prepare_export_dir,
)
from alignkit.export.reward import export_reward_model, is_reward_run
from alignkit.export.template import export_chat_template
from alignkit.export.verify import verify_export, vllm_check
from alignkit.models.architectures import auto_class_for
from alignkit.models.loading import check_model_dir, merge_adapters
from alignkit.runs import ModelSpec


def load_merged(spec: ModelSpec, dtype: torch.dtype, trust_remote_code: bool = False, device_map: str | None = None):
    """The base with every adapter merged in order (a plain ``PreTrainedModel``)."""
    check_model_dir(spec.base)
    model = auto_class_for(spec.base, trust_remote_code).from_pretrained(  # a VL checkpoint keeps its own class
        spec.base, dtype=dtype, trust_remote_code=trust_remote_code, device_map=device_map
    )
    return merge_adapters(model, spec.adapters).eval()


def export_model(cfg: ExportConfig) -> dict[str, Any]:
    """Merge, save and (unless ``cfg.verify`` is false) verify; returns the report written to
    ``export_dir/export_report.json`` (``report["passed"]`` is the verdict).

    A policy (SFT/PPO, LoRA or full) exports as ``*ForCausalLM``; a reward-model run as
    ``*ForSequenceClassification`` with ``num_labels=1`` (``export_reward_model``).
    """
    if cfg.run_dir and is_reward_run(cfg.run_dir):
        return export_reward_model(cfg)
    spec = cfg.model_spec()
    for adapter in spec.adapters:
        if (Path(adapter) / "score_head.safetensors").is_file():
            raise ValueError(f"adapter {adapter} is a reward model's; export it on its own with run_dir: {adapter}")
    out = Path(cfg.export_dir)
    prepare_export_dir(out, spec)
    dtype = DTYPES[cfg.export_dtype] if cfg.export_dtype else base_dtype(spec.base)
    device_map = "auto" if cfg.export_device == "auto" and torch.cuda.is_available() else None
    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer_dir, trust_remote_code=cfg.trust_remote_code)

    # 1. Merge every adapter in order into the base; only the policy adapter is read from a
    #    PPO dir, so value head and critic never enter the weights.
    model = load_merged(spec, dtype, cfg.trust_remote_code, device_map)
    base_arch = AutoConfig.from_pretrained(spec.base, trust_remote_code=cfg.trust_remote_code).architectures
    model.config.architectures = base_arch

    # 2. Generation config: stop on the template's end-of-turn token too, as training did.
    from alignkit.generation import stop_token_ids

    template = get_template(spec.template, tokenizer)
    model.generation_config.eos_token_id = stop_token_ids(tokenizer, template, model)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    # 3. Save weights (sharded), tokenizer with the run's chat template, processor files, extras.
    model.save_pretrained(out, max_shard_size=int(cfg.export_size * 1e9))
    del model
    chat_template = export_chat_template(tokenizer, spec.template, spec.default_system)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(out)
    processor_files = copy_processor_files(spec.base, out)
    extras = copy_extras(spec, out)

    report: dict[str, Any] = {
        "export_dir": str(out),
        "base": spec.base,
        "adapters": spec.adapters,
        "run_dir": spec.run_dir,
        "template": spec.template,
        "default_system": spec.default_system,
        "dtype": str(dtype).removeprefix("torch."),
        "processor_files": processor_files,
        "extras": extras,
    }
    if cfg.verify:
        report["verify"] = verify_export(out, spec, dtype, cfg.verify_tolerance, cfg.trust_remote_code)
        report["passed"] = all(c["ok"] for c in report["verify"].values() if isinstance(c, dict) and "ok" in c)
    else:
        report["verify"] = "skipped: --no-verify"
        report["passed"] = None
    return finish_report(report, cfg, out, lambda: vllm_check(out))
