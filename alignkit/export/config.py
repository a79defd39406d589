"""Export's tool config (``ExportConfig``) and what the non-training commands (export, chat,
predict, compare) share: the YAML loader, comma-list keys, dtype names. What a run directory
consists of lives in ``alignkit.runs``."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from alignkit.config import explain_validation_error, normalise_keys, read_raw
from alignkit.runs import ModelSpec, build_spec

logger = logging.getLogger(__name__)

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
        return cls(**normalise_keys(raw, cls, where))
    except ValidationError as err:
        raise explain_validation_error(err, where, cls) from None


def add_config_command(subparsers: argparse._SubParsersAction, name: str, help: str, cls: type[BaseModel],
                       func: Callable[[argparse.Namespace], int]) -> None:
    """``alignkit NAME CONFIG.yaml [key=value ...]``, its help listing ``cls``'s keys."""
    p = subparsers.add_parser(name, help=help, description=f"alignkit {name} CONFIG.yaml [key=value ...]\n"
                              f"Keys: {', '.join(cls.model_fields)}", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys")
    p.set_defaults(func=func)


def comma_list(v: Any) -> Any:
    """``"a, b"`` -> ``["a", "b"]`` (LLaMA-Factory writes lists as comma strings); other values unchanged."""
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    return v


# A list key that also accepts a comma string.
CommaList = Annotated[list[str], BeforeValidator(comma_list)]


# ---------------------------------------------------------------- config


class ExportConfig(BaseModel):
    """``alignkit export`` keys (LLaMA-Factory's names)."""

    model_config = ConfigDict(extra="forbid")
    IGNORED: ClassVar[dict[str, str]] = {"finetuning_type": "whatever adapter_name_or_path lists is merged", "stage": "export has no stage"}

    model_name_or_path: str | None = Field(None, description="Base model directory (or a run dir).")
    adapter_name_or_path: CommaList | None = Field(
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
