"""Export's config (``ExportConfig``) and the dtype names export and the tools accept. The loader
and comma-list keys are ``alignkit.tools.config``'s; what a run directory consists of lives in
``alignkit.runs``."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from alignkit.runs import ModelSpec, build_spec
from alignkit.tools.config import CommaList

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}



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
