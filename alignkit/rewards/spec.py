"""The reward keys a stage config shares (PPO, compare): one declaration, validated at load.

``RewardSpec`` is a mixin of flat, LLaMA-Factory-style keys (``reward_model``,
``reward_model_type`` ...) plus the typed ``reward_api`` block. ``RewardContext`` is what a
trained reward model needs to know about the stage that scores with it, so the reward builders
never read a whole stage config.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from alignkit.rewards.api.config import LIFTED, ApiSettings, LlamaFactoryApi, RewardApiConfig
from alignkit.rewards.api.headers import check_env
from alignkit.rewards.api.transport import check_url, is_http_url
from alignkit.rewards.failures import OnFailure
from alignkit.rewards.rules import BUILTIN_RULES
from alignkit.rewards.text import DEFAULT_THINK_TAGS

logger = logging.getLogger(__name__)
RewardType = Literal["rule", "api", "lora", "full"]


@dataclass(frozen=True)
class RewardContext:
    """What a trained reward model takes from the stage that scores with it."""

    base_model: str | None = None  # the policy's base: a LoRA reward adapter must match it
    adapters: tuple[str, ...] = ()  # adapters merged into that base (a mismatch is warned about)
    template: str = "auto"  # fallbacks where the reward model did not record its own
    default_system: str | None = None
    enable_thinking: bool | None = None
    cutoff_len: int = 1024  # tokens per scored (prompt, response)
    batch_size: int = 8  # sequences per reward-model forward pass
    bf16: bool = False
    fp16: bool = False
    device: str | None = None  # a full reward model's device when reward_model_device is unset; None: the policy's


class RewardSpec(BaseModel):
    """Where scores come from and what a failed or thinking response does to them."""

    model_config = ConfigDict(extra="forbid")

    reward_model: str | None = Field(
        None, description="rule: built-in name, module:NAME or file.py:fn; api: judge URL; lora/full: RM directory."
    )
    reward_model_type: RewardType | None = Field(
        None, description="Where scores come from: rule, api (HTTP judge), lora (RM adapter on the policy's base), "
        "full. Unset: inferred from reward_model (URL: api; RM directory: lora, or full with full fine-tuning; rule name)."
    )
    reward_model_adapters: str | None = Field(
        None, description="LLaMA-Factory style: the RM adapter directory (with its score head); reward_model is then its base."
    )
    reward_model_device: str | None = Field(
        None, description="Device for a full reward model (e.g. cuda:1; default: the policy's, compare: cpu)."
    )
    reward_api: RewardApiConfig | None = Field(
        None, description="HTTP judge settings, by preset (docs/reward_api.md)."
    )
    on_failure: OnFailure = Field(
        "skip", description="A failed score: skip (mask the sample out), zero (use 0.0), or fail (stop the run)."
    )
    max_failure_rate: float = Field(
        0.5, ge=0.0, le=1.0, description="Stop the run when a step's failed fraction exceeds this (0-1)."
    )
    strip_think: bool | None = Field(
        None, description="Remove the thought (between think_tags) before scoring. Unset: on with a thinking "
        "template (qwen3 and its LLaMA-Factory names), off otherwise."
    )
    think_tags: tuple[str, str] = Field(DEFAULT_THINK_TAGS, description="Opening and closing tag of a thought.")
    think_truncated: Literal["score", "fail"] = Field(
        "score", description="A response cut off inside its thought: give it think_truncated_score, or fail it."
    )
    think_truncated_score: float = Field(0.0, description="Score of a response cut off inside its thought.")
    include_special_tokens: bool = Field(
        False, description="Keep special tokens (chat-template markers) in the response text that is scored."
    )
    reward_cache: str | None = Field(
        None, description="SQLite file keeping successful scores across steps and runs; null: no cache."
    )
    judge_canaries: bool | dict[str, str] | None = Field(
        None, description="Score degenerate answers (':', '', 'Thought process:', the prompt echoed ...) on the "
        "reward_probe_every schedule as canary/<name>; a {name: text} mapping adds your own. Unset: on for api judges "
        "(not the llamafactory and openrlhf shapes, which read templated text)."
    )

    def canaries(self) -> dict[str, str] | None:
        """The user's extra canaries when canaries are on (``{}``: the built-ins only), else ``None``."""
        on = self.judge_canaries
        if on is None:  # on for API judges, but not for full-text ones: they read templated text, canaries are plain
            on = self.reward_model_type == "api" and self.reward_api is not None and not self.reward_api_full_text()
        if on is False:
            return None
        return dict(on) if isinstance(on, dict) else {}

    @model_validator(mode="before")
    @classmethod
    def _infer_reward_type(cls, data: Any) -> Any:
        """LLaMA-Factory configs name a reward model without its type (their default is lora)."""
        if not isinstance(data, dict) or data.get("reward_model_type") is not None:
            return data
        kind, why = infer_reward_type(data.get("reward_model_adapters") or data.get("reward_model"),
                                      isinstance(data.get("reward_api"), dict) and bool(data["reward_api"].get("url")),
                                      data.get("finetuning_type", "lora"))
        logger.info("reward_model_type not set: using %s (%s)", kind, why)
        return {**data, "reward_model_type": kind}

    @model_validator(mode="before")
    @classmethod
    def _lift_reward_api_keys(cls, data: Any) -> Any:
        """Configs written before these keys were shared by every source set them under reward_api."""
        if not isinstance(data, dict) or not isinstance(data.get("reward_api"), dict):
            return data
        data, api = dict(data), dict(data["reward_api"])
        for old, new in LIFTED.items():
            if old not in api:
                continue
            value = api.pop(old)
            if new in data and _plain(data[new]) != _plain(value):
                raise ValueError(
                    f"reward_api.{old}={value!r} and {new}={data[new]!r} disagree; set only {new}"
                )
            data[new] = value
        data["reward_api"] = api
        return data

    @model_validator(mode="after")
    def _think_default(self) -> RewardSpec:
        """A thinking model's thought is not its answer: with a thinking template (the stage's
        ``template``), the judge sees the answer only unless strip_think is set to false."""
        if self.strip_think is None:
            from alignkit.data.templates import is_thinking_template

            template = getattr(self, "template", None)
            on = isinstance(template, str) and is_thinking_template(template)
            if on:
                logger.info("template %r writes <think> blocks: strip_think is on (the judge scores the answer; "
                            "set strip_think: false to score the thought too)", template)
            object.__setattr__(self, "strip_think", on)  # no re-validation: a stage config validates assignments
        return self

    @model_validator(mode="after")
    def _check_reward_source(self) -> RewardSpec:
        api_url = self.reward_api.url if self.reward_api is not None else None
        if self.reward_model is None and not (self.reward_model_type == "api" and api_url):
            raise ValueError("key 'reward_model' is required (rule name, judge URL, or reward model directory)")
        if self.reward_model_type == "api" and not api_url:
            check_url(self.reward_model, "reward_model")  # the judge URL: fail now, not after models load
        if self.reward_model_type == "api" and self.reward_api is not None:
            check_env(self.reward_api.headers)  # a missing ${VAR}: fail now, not after models load
        return self

    def reward_api_full_text(self) -> bool:
        return self.reward_api is None or self.reward_api.preset in ("llamafactory", "openrlhf")

    def api_settings(self) -> ApiSettings:
        """The judge's settings, with the URL taken from ``reward_model`` when ``reward_api.url`` is unset.

        Only a URL and no ``reward_api`` block is a LLaMA-Factory config (``reward_model_type: api``
        there sends its own request shape), so it gets the ``llamafactory`` preset."""
        api = self.reward_api
        if api is None:
            logger.info("reward_api not set: scoring with the llamafactory request shape (set reward_api.preset "
                        "to alignkit, openrlhf, openai_judge or custom for another)")
            api = LlamaFactoryApi(preset="llamafactory")
        return api if api.url else api.model_copy(update={"url": self.reward_model})

    @property
    def reward_dir(self) -> str | None:
        """The trained reward model's directory (the one holding its score head)."""
        return self.reward_model_adapters or self.reward_model

    @property
    def reward_base(self) -> str | None:
        """The base model under ``reward_model_adapters`` (LLaMA-Factory style), else ``None`` (recorded)."""
        return self.reward_model if self.reward_model_adapters else None


def infer_reward_type(reward_model: Any, has_api_url: bool, finetuning_type: Any = "lora") -> tuple[RewardType, str]:
    """The ``reward_model_type`` a ``reward_model`` value means, and why (for the log line)."""
    if reward_model is None:
        return ("api", "reward_api.url is set") if has_api_url else ("rule", "no reward_model")
    text = str(reward_model)
    if is_http_url(text):
        return "api", "reward_model is an http(s) URL"
    path = Path(text)
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            if finetuning_type == "lora":
                return "lora", f"{text} holds a reward adapter; it goes on the policy's base"
            return "full", f"{text} holds a reward adapter and finetuning_type is {finetuning_type}"
        if (path / "config.json").is_file():
            return "full", f"{text} is a full model directory"
        raise ValueError(f"reward_model {text!r} is a directory but holds neither adapter_config.json (a LoRA reward "
                         "model) nor config.json (a full one); point it at the output_dir of an RM run")
    if text in BUILTIN_RULES or ":" in text:
        return "rule", f"{text!r} names a rule"
    raise ValueError(f"reward_model {text!r} is not an http(s) URL, an existing directory or a rule "
                     f"({', '.join(BUILTIN_RULES)}, module:NAME or file.py:fn); fix it or set reward_model_type")


def _plain(value: Any) -> Any:
    # YAML gives lists where the config holds tuples (think_tags): compare them as equal.
    return tuple(value) if isinstance(value, list) else value
