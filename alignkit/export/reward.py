"""Export a reward-model run as one ``*ForSequenceClassification`` directory, verified."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from alignkit.data.templates import get_template
from alignkit.export.config import DTYPES, ExportConfig
from alignkit.export.output import base_dtype, finish_report, prepare_export_dir
from alignkit.export.template import export_chat_template
from alignkit.export.verify import TOLERANCE, VERIFY_PROMPTS, weight_files, weight_keys
from alignkit.models.loading import check_model_dir
from alignkit.runs import ModelSpec, read_run_config

# A sequence classifier keeps its ``score`` head but has no LM head.
RM_FORBIDDEN_KEY_PARTS = ("v_head", "summary", "pretrained_model.", "base_model.model.", "lora_", "lm_head")


def is_reward_run(path: str | Path) -> bool:
    """An RM output_dir: ``stage: rm`` in its config, or the reward model's own metadata file."""
    from alignkit.models.reward_model import META_FILE

    found = read_run_config(path)
    return (found is not None and found[0].get("stage") == "rm") or (Path(path) / META_FILE).is_file()


def export_reward_model(cfg: ExportConfig) -> dict[str, Any]:
    """An RM run (LoRA adapter + score head, or full) as one ``*ForSequenceClassification`` dir
    (``num_labels=1``, head at ``score.weight``), verified against the unmerged reward model."""
    from transformers import AutoModelForSequenceClassification

    from alignkit.models.reward_model import load_reward_model
    from alignkit.rewards.model import encode_for_scoring

    run = str(check_model_dir(cfg.run_dir, "run_dir"))
    out = Path(cfg.export_dir)
    rm, tokenizer, meta = load_reward_model(run, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)
    spec = ModelSpec(base=meta.get("base_model") or run, adapters=list(meta.get("merged_adapters") or []),
                     template=cfg.template or meta.get("template") or "auto",
                     default_system=cfg.default_system if cfg.default_system is not None else meta.get("default_system"),
                     enable_thinking=meta.get("enable_thinking"), stage="rm", run_dir=run)
    prepare_export_dir(out, spec)
    dtype = DTYPES[cfg.export_dtype] if cfg.export_dtype else base_dtype(spec.base)

    # 1. Merge the RM adapter; wrap backbone + head as the HF sequence classifier (no copy).
    backbone = rm.model.merge_and_unload().base_model if rm.is_lora else rm.backbone
    config = sequence_classifier_config(backbone.config, tokenizer.pad_token_id)
    model = AutoModelForSequenceClassification.from_config(config)
    setattr(model, model.base_model_prefix, backbone)
    model.score = rm.score
    model.to(dtype).save_pretrained(out, max_shard_size=int(cfg.export_size * 1e9))
    chat_template = export_chat_template(tokenizer, spec.template, spec.default_system)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(out)
    del model, rm, backbone

    report: dict[str, Any] = {"export_dir": str(out), "kind": "reward_model", "run_dir": run, "base": spec.base,
                              "template": spec.template, "dtype": str(dtype).removeprefix("torch."), "extras": []}
    if not cfg.verify:
        report["verify"], report["passed"] = "skipped: --no-verify", None
        return finish_report(report, cfg, out, lambda: {"status": "skipped: the vLLM check covers causal-LM exports"})

    # 2. Verify: strict plain reload, names, architecture, scores vs the unmerged reward model.
    checks: dict[str, Any] = {}
    files, checks["shards"] = weight_files(out)
    keys = weight_keys(out, files)
    bad = sorted(k for k in keys if any(part in k for part in RM_FORBIDDEN_KEY_PARTS))
    checks["weight_names"] = {"ok": not bad and "score.weight" in keys, "num_tensors": len(keys), "forbidden": bad[:10]}
    model, info = AutoModelForSequenceClassification.from_pretrained(out, dtype=dtype, output_loading_info=True)
    info = {k: sorted(map(str, v)) for k, v in info.items() if v}
    checks["plain_load"] = {"ok": not info, "loader": "AutoModelForSequenceClassification.from_pretrained", **info}
    checks["architecture"] = {"ok": model.config.architectures == config.architectures and model.config.num_labels == 1,
                              "export": model.config.architectures, "num_labels": model.config.num_labels}
    template = get_template(spec.template, tokenizer)
    seqs = [encode_for_scoring(tokenizer, template, p, "A short answer.", 1024, spec.default_system,
                               spec.enable_thinking) for p in VERIFY_PROMPTS]
    with torch.no_grad():
        got = torch.tensor([float(model(torch.tensor([s])).logits[0, 0]) for s in seqs])
        del model
        ref, _, _ = load_reward_model(run, dtype=dtype)
        want = torch.tensor([float(ref(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0]) for s in seqs])
    diff, rel = float((got - want).abs().max()), cfg.verify_tolerance or TOLERANCE[dtype]
    scale = max(1.0, float(want.abs().max()))
    checks["scores"] = {"ok": diff <= rel * scale, "max_abs_diff": diff, "tolerance": rel * scale,
                        "tolerance_rule": f"{rel:g} x max(1, max|reference score|)",
                        "reference": "alignkit RewardModel from the run dir, unmerged", "export": got.tolist(),
                        "reference_scores": want.tolist()}
    report["verify"] = checks
    report["passed"] = all(c["ok"] for c in checks.values())
    return finish_report(report, cfg, out, lambda: {"status": "skipped: the vLLM check covers causal-LM exports"})


def sequence_classifier_config(config, pad_token_id: int | None):
    """The backbone's config as its ``*ForSequenceClassification`` (one label; HF's classifier
    finds the last token through ``pad_token_id``)."""
    import copy

    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    config = copy.deepcopy(config)
    arch = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(config.model_type)
    if arch is None:
        raise ValueError(f"model type {config.model_type!r} has no *ForSequenceClassification class in transformers")
    config.architectures, config.num_labels = [arch], 1
    if pad_token_id is not None:
        config.pad_token_id = pad_token_id
    return config
