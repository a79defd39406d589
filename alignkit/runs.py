"""A run directory (an SFT/PPO/RM ``output_dir``, or one of its checkpoints): its saved config, and
what model it consists of (``ModelSpec``: a base, adapters in order, the template it was prompted with).

Training writes the directory (``alignkit.train``; its checkpoints are ``alignkit.train.checkpoint``'s);
the tools read it (export, chat, predict, compare). This module only reads files: it loads no model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alignkit.config import ConfigError
from alignkit.models.loading import check_model_dir

logger = logging.getLogger(__name__)

RUN_CONFIG = "alignkit_config.yaml"


def read_run_config(run_dir: str | Path) -> tuple[dict[str, Any], Path] | None:
    """A run's resolved config and its path; a ``checkpoint-N`` dir uses its run's. ``None`` when there is none."""
    run = Path(run_dir)
    for candidate in (run / RUN_CONFIG, run.parent / RUN_CONFIG):
        if candidate.is_file():
            data = yaml.safe_load(candidate.read_text())
            if isinstance(data, dict) and "model_name_or_path" in data:
                return data, candidate
    return None


@dataclass
class ModelSpec:
    """A base directory, the adapters applied on it in order, and how the run prompted it."""

    base: str
    adapters: list[str] = field(default_factory=list)
    template: str = "auto"
    default_system: str | None = None
    enable_thinking: bool | None = None
    stage: str | None = None
    run_dir: str | None = None

    @property
    def tokenizer_dir(self) -> str:
        """The last adapter/run dir that saved a tokenizer (training may have changed it), else the base."""
        for d in reversed([*self.adapters, self.run_dir or ""]):
            if d and (Path(d) / "tokenizer_config.json").is_file():
                return d
        return self.base


def resolve_run(run_dir: str | Path) -> ModelSpec:
    """What an SFT/PPO ``output_dir`` (or one of its checkpoints) consists of, from its config.

    LoRA SFT continues the *last* listed adapter (``models.loading.build_policy_model``), so the run's adapter
    replaces it; PPO merges *every* listed adapter and trains a new one on top
    (``alignkit.train.ppo.build_models``). A full fine-tune saved a whole model: it is the base.
    """
    run = check_model_dir(str(run_dir), "run_dir")
    found = read_run_config(run)
    if found is None:
        raise FileNotFoundError(
            f"run_dir {run}: no {RUN_CONFIG} here or in its parent; give model_name_or_path "
            "(and adapter_name_or_path) instead"
        )
    cfg, cfg_path = found
    stage = cfg.get("stage")
    if stage == "rm":
        raise ValueError(
            f"{run} is a reward-model run (stage: rm, {cfg_path}): it scores text and cannot generate. "
            "Use it as reward_model (reward_model_type: full or lora), or `alignkit export` it as a "
            "*ForSequenceClassification directory."
        )
    prior = [str(p) for p in (cfg.get("adapter_name_or_path") or [])]
    if (run / "adapter_config.json").is_file():
        before = prior if stage in ("ppo", "dpo", "kto") else prior[:-1]  # these merge every adapter
        base, adapters = str(cfg["model_name_or_path"]), [*before, str(run)]
    elif (run / "config.json").is_file():
        base, adapters = str(run), []
    else:
        raise FileNotFoundError(f"run_dir {run}: neither adapter_config.json (LoRA) nor config.json (full model)")
    for path, what in [(base, "model_name_or_path"), *[(a, "adapter_name_or_path") for a in adapters]]:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{cfg_path}: {what} {path!r} is not a directory (relative to {Path.cwd()})")
    return ModelSpec(
        base=base,
        adapters=adapters,
        template=cfg.get("template") or "auto",
        default_system=cfg.get("default_system"),
        enable_thinking=cfg.get("enable_thinking"),
        stage=stage,
        run_dir=str(run),
    )


def build_spec(
    model: str | None,
    adapters: list[str] | None = None,
    template: str | None = None,
    default_system: str | None = None,
    enable_thinking: bool | None = None,
) -> ModelSpec:
    """``model`` is a model dir or a run dir; explicit adapters are applied literally, in order.

    Template settings not given are read from the run (or the last adapter's run config).
    Every directory is checked here, before anything is loaded.
    """
    if model is None:
        raise ConfigError("key 'model_name_or_path' (or 'run_dir') is required")
    is_run = not adapters and read_run_config(model) is not None
    if is_run:
        spec = resolve_run(model)
    else:
        for adapter in adapters or []:
            check_model_dir(adapter, "adapter_name_or_path")
        spec = ModelSpec(base=str(check_model_dir(model)), adapters=list(adapters or []))
    if not is_run and spec.adapters:
        _warn_missing_prior(spec.adapters)
        found = read_run_config(spec.adapters[-1])
        if found:
            run_cfg = found[0]
            spec.template = run_cfg.get("template") or "auto"
            spec.default_system = run_cfg.get("default_system")
            spec.enable_thinking = run_cfg.get("enable_thinking")
    spec.template = template or spec.template
    spec.default_system = default_system if default_system is not None else spec.default_system
    spec.enable_thinking = enable_thinking if enable_thinking is not None else spec.enable_thinking
    return spec


def _warn_missing_prior(adapters: list[str]) -> None:
    """A PPO adapter was trained on base + its SFT adapters; applying it alone gives another model."""
    for i, path in enumerate(adapters):
        found = read_run_config(path)
        if not found or found[0].get("stage") != "ppo":
            continue
        missing = [p for p in found[0].get("adapter_name_or_path") or [] if p not in adapters[:i]]
        if missing:
            logger.warning(
                "adapter %s was trained on top of %s (its %s), which is not applied before it; "
                "pass the run dir itself to apply everything in order", path, missing, found[1]
            )
