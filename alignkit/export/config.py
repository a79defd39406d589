"""Export's tool config and what a run consists of: ``ExportConfig``, the YAML loader shared by the
non-training commands (export, predict, compare), and run-dir resolution into a ``ModelSpec``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from alignkit.config import ConfigError, _explain, _normalise_keys, read_raw
from alignkit.models.loading import check_model_dir

logger = logging.getLogger(__name__)

RUN_CONFIG = "alignkit_config.yaml"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------- small YAML configs


def load_tool_config(
    cls: type[BaseModel], path: str | Path | None, overrides: list[str] | None = None, **extra: Any
) -> Any:
    """A non-training config (export, predict, compare): YAML + ``key=value`` overrides + ``extra``,
    validated with the same unknown-key suggestions and error wording as the stage configs."""
    where = str(path) if path else "command line"
    raw = read_raw(path, overrides)
    # Command-line flags (``extra``) win over the file and its overrides here.
    raw.update({k: v for k, v in extra.items() if v is not None})
    for old, new in getattr(cls, "ALIASES", {}).items():
        if old in raw:
            raw[new] = raw.pop(old)
    ignored = getattr(cls, "IGNORED", {})
    for key in [k for k in raw if k in ignored]:
        logger.warning("%s: key %r has no effect here (%s); ignoring it", where, key, ignored[key])
        raw.pop(key)
    try:
        return cls(**_normalise_keys(raw, cls, where))
    except ValidationError as err:
        raise _explain(err, where) from None


def _comma_list(v: Any) -> Any:
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    return v


# ---------------------------------------------------------------- what to load


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


def read_run_config(run_dir: str | Path) -> tuple[dict[str, Any], Path] | None:
    """A run's resolved config; a ``checkpoint-N`` dir uses its run's. ``None`` when there is none."""
    run = Path(run_dir)
    for candidate in (run / RUN_CONFIG, run.parent / RUN_CONFIG):
        if candidate.is_file():
            data = yaml.safe_load(candidate.read_text())
            if isinstance(data, dict) and "model_name_or_path" in data:
                return data, candidate
    return None


def resolve_run(run_dir: str | Path) -> ModelSpec:
    """What an SFT/PPO ``output_dir`` (or one of its checkpoints) consists of, from its config.

    LoRA SFT continues the *last* listed adapter (``load_for_training``), so the run's adapter
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
        before = prior if stage == "ppo" else prior[:-1]
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
    """
    if model is None:
        raise ConfigError("key 'model_name_or_path' (or 'run_dir') is required")
    is_run = not adapters and read_run_config(model) is not None
    spec = resolve_run(model) if is_run else ModelSpec(base=str(check_model_dir(model)), adapters=list(adapters or []))
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


# ---------------------------------------------------------------- config


class ExportConfig(BaseModel):
    """``alignkit export`` keys (LLaMA-Factory's names)."""

    model_config = ConfigDict(extra="forbid")
    IGNORED: ClassVar[dict[str, str]] = {"finetuning_type": "whatever adapter_name_or_path lists is merged", "stage": "export has no stage"}

    model_name_or_path: str | None = Field(None, description="Base model directory (or a run dir).")
    adapter_name_or_path: list[str] | None = Field(
        None, description="Adapter dir or list (comma string allowed), merged in order, e.g. SFT then PPO."
    )
    run_dir: str | None = Field(
        None, description="An SFT/PPO output_dir: base and adapters are read from its alignkit_config.yaml."
    )
    template: str | None = Field(None, description="Chat template written to the export (default: the run's, else auto).")
    default_system: str | None = Field(None, description="Default system prompt baked into the exported chat template.")
    enable_thinking: bool | None = Field(None, description="Qwen3-style templates: thinking off in the verify prompts.")
    export_dir: str = Field(description="Directory the merged model is written to.")
    export_size: float = Field(5.0, gt=0, description="Largest safetensors shard, in GB (10^9 bytes).")
    export_device: Literal["cpu", "auto"] = Field("cpu", description="Merge on cpu, or auto (accelerate device_map).")
    export_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="Dtype of the exported weights (default: the base's)."
    )
    export_legacy_format: bool = Field(False, description="Must be false: alignkit writes safetensors only.")
    trust_remote_code: bool = Field(False, description="Allow custom model code from the model directory.")
    verify: bool = Field(True, description="Reload the export and compare logits with base + adapters.")
    verify_tolerance: float | None = Field(
        None, gt=0, description="Relative logit tolerance (default 1e-4 fp32, 2e-2 bf16, 1e-2 fp16)."
    )
    vllm_check: bool = Field(False, description="Also load the export in vLLM and generate (needs a GPU and vllm).")

    @field_validator("adapter_name_or_path", mode="before")
    @classmethod
    def _lists(cls, v: Any) -> Any:
        return _comma_list(v)

    @model_validator(mode="after")
    def _check(self) -> ExportConfig:
        if self.export_legacy_format:
            raise ValueError("export_legacy_format: true (.bin files) is not supported; alignkit writes safetensors")
        if self.run_dir and (self.model_name_or_path or self.adapter_name_or_path):
            raise ValueError("give either run_dir, or model_name_or_path (+ adapter_name_or_path), not both")
        if not (self.run_dir or self.model_name_or_path):
            raise ValueError("key 'model_name_or_path' or 'run_dir' is required")
        return self

    def model_spec(self) -> ModelSpec:
        if self.run_dir:
            return build_spec(self.run_dir, None, self.template, self.default_system, self.enable_thinking)
        return build_spec(
            self.model_name_or_path, self.adapter_name_or_path, self.template, self.default_system, self.enable_thinking
        )
