"""Rollout engines by name: each one a typed settings block and a builder, behind one registry.

A config's ``rollout: {engine: NAME, ...}`` block is validated by the engine's own settings
class; ``build_engine`` then builds it. Adding an engine is a settings class, a builder and one
``register_engine`` line; the RL loop never names an engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from alignkit.generation.engine import HFEngine, RolloutEngine


class EngineSettings(BaseModel):
    """Settings every engine has. Subclasses add their own, each with a one-line description."""

    model_config = ConfigDict(extra="forbid")
    engine: str = Field("hf", description="The rollout engine: hf (alignkit's sampler) or a registered one.")
    sync_tolerance: float = Field(
        0.05, gt=0.0, description="Stop when the engine's and the trainer's log-probs of the sampled tokens differ "
        "by more than this (mean |diff| per token; checked every step when the engine reports log-probs and "
        "top_k 0, top_p 1)."
    )


class HFSettings(EngineSettings):
    engine: Literal["hf"] = "hf"
    worker: Literal["none", "process"] = Field(
        "none", description="process: sample in a rollout worker process with its own copy of the policy (text "
        "prompts), sent the weights after each update; with async_level >= 1 rollout then overlaps the update."
    )


class VLLMSettings(EngineSettings):
    engine: Literal["vllm"] = "vllm"
    gpu_memory_utilization: float = Field(0.3, gt=0.0, le=1.0, description="Share of device memory vLLM may take.")
    tensor_parallel_size: int = Field(1, ge=1, description="Devices one engine shards the model over.")
    enable_sleep_mode: bool = Field(False, description="Release vLLM's memory during the update (GPU only).")
    max_model_len: int | None = Field(None, ge=8, description="Longest sequence (default: cutoff_len).")


@dataclass(frozen=True)
class EngineContext:
    """What any engine may need from the run besides its own settings."""

    model_name_or_path: str  # the base on disk (engines that load their own copy)
    pad_token_id: int
    dtype: str  # "bfloat16" | "float16" | "float32": the trainer's precision
    max_model_len: int  # cutoff_len: the longest prompt + response
    seed: int
    adapters: tuple[str, ...] = ()  # adapter_name_or_path: merged into the in-memory base (not the one on disk)
    output_dir: str | None = None  # the run's directory (engines that write files for other processes)


Builder = Callable[[Any, torch.nn.Module, EngineContext], RolloutEngine]


@dataclass(frozen=True)
class EngineSpec:
    settings: type[EngineSettings]
    build: Builder  # (settings, policy ActorCritic, context) -> engine holding the policy's current weights
    accepts_images: bool = False  # takes a VL prompt's pixel inputs in generate(pixels=...)
    needs_whole_weights: bool = False  # reads the whole policy to sync (refused under ZeRO-3/FSDP for now)


ENGINES: dict[str, EngineSpec] = {}


def register_engine(name: str, settings: type[EngineSettings], build: Builder, *, accepts_images: bool = False,
                    needs_whole_weights: bool = False) -> None:
    ENGINES[name] = EngineSpec(settings, build, accepts_images, needs_whole_weights)


def engine_settings(raw: Any) -> EngineSettings:
    """A ``rollout:`` block (dict, or settings already built) validated by its engine's class; one
    ValueError naming every bad key (``rollout.gpu_memory_utilization: ...``) and the known engines."""
    if isinstance(raw, EngineSettings):
        return raw
    raw = dict(raw or {})
    name = raw.get("engine", "hf")
    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; registered: {', '.join(sorted(ENGINES))}")
    try:
        return ENGINES[name].settings.model_validate(raw)
    except ValidationError as e:
        problems = [f"rollout.{'.'.join(map(str, err['loc']))}: {err['msg']} (got {err.get('input')!r})"
                    if err["type"] != "extra_forbidden" else
                    f"unknown key rollout.{err['loc'][-1]} for engine {name} (its keys: "
                    f"{', '.join(ENGINES[name].settings.model_fields)})" for err in e.errors()]
        raise ValueError("; ".join(problems)) from None


def build_engine(settings: EngineSettings, policy: torch.nn.Module, ctx: EngineContext) -> RolloutEngine:
    """The configured engine, sampling from ``policy``'s current weights."""
    return ENGINES[settings.engine].build(settings, policy, ctx)


def _build_hf(settings: HFSettings, policy: torch.nn.Module, ctx: EngineContext) -> RolloutEngine:
    if settings.worker == "process":
        from alignkit.generation.worker import HFWorkerEngine  # a process and its queues: only when asked for

        return HFWorkerEngine(policy, ctx.pad_token_id, sync_tolerance=settings.sync_tolerance)
    return HFEngine(policy.lm, ctx.pad_token_id, sync_tolerance=settings.sync_tolerance)


def _build_vllm(settings: VLLMSettings, policy: torch.nn.Module, ctx: EngineContext) -> RolloutEngine:
    from alignkit.generation.vllm_engine import VLLMEngine  # optional dependency, imported on use

    engine = VLLMEngine(
        ctx.model_name_or_path, ctx.pad_token_id, dtype=ctx.dtype, max_model_len=settings.max_model_len or ctx.max_model_len,
        gpu_memory_utilization=settings.gpu_memory_utilization, tensor_parallel_size=settings.tensor_parallel_size,
        enable_sleep_mode=settings.enable_sleep_mode, seed=ctx.seed, sync_tolerance=settings.sync_tolerance,
    )
    engine.sync_weights(policy)  # the base on disk lacks the merged SFT adapters (and a resumed run's weights)
    return engine


register_engine("hf", HFSettings, _build_hf, accepts_images=True)
register_engine("vllm", VLLMSettings, _build_vllm, needs_whole_weights=True)
