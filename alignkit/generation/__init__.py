"""Sampling (KV-cache loop, stop tokens, EOS masks) and the rollout engines behind ``RolloutEngine``,
built by name from a typed settings block (``registry``); ``weights`` is what a sync sends."""

from alignkit.generation.engine import HFEngine, RolloutEngine, SamplingParams
from alignkit.generation.registry import (
    ENGINES,
    EngineContext,
    EngineSettings,
    build_engine,
    engine_settings,
    register_engine,
)
from alignkit.generation.sampling import (
    Rollout,
    decode_responses,
    filter_logits,
    first_eos_mask,
    sample,
    stop_token_ids,
)
from alignkit.generation.server_engine import ServerSettings, VLLMServerEngine  # registers vllm_server
from alignkit.generation.weights import SyncCheck

__all__ = [
    "ENGINES",
    "EngineContext",
    "EngineSettings",
    "HFEngine",
    "Rollout",
    "RolloutEngine",
    "SamplingParams",
    "ServerSettings",
    "SyncCheck",
    "VLLMServerEngine",
    "build_engine",
    "decode_responses",
    "engine_settings",
    "filter_logits",
    "first_eos_mask",
    "register_engine",
    "sample",
    "stop_token_ids",
]
