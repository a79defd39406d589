"""``ChatFormat``: everything that decides how a conversation becomes tokens for one model — its
tokenizer, chat template, default system prompt, thinking switch and (VL models) image processor.

The encoders (``alignkit.data.encode``), the stages, PPO's prompts, the tools' generator and the
reward model take one ``ChatFormat`` instead of passing these five values along separately.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from alignkit.data.loader import Example
from alignkit.data.templates import AutoTemplate, Segments, Template, get_template
from alignkit.data.vision import VisionProcessor, prompt_messages


class FormatKeys(Protocol):
    """The keys a config (stage, tool) or a run's ``ModelSpec`` names the format with."""

    template: str
    default_system: str | None
    enable_thinking: bool | None


@dataclass(frozen=True)
class ChatFormat:
    tokenizer: Any
    template: Template | AutoTemplate
    default_system: str | None = None  # None: the template's own default
    enable_thinking: bool | None = None  # Qwen3-style templates: False renders with thinking off
    vision: VisionProcessor | None = None  # None: a text-only model

    @classmethod
    def named(cls, tokenizer: Any, template: str = "auto", default_system: str | None = None,
              enable_thinking: bool | None = None, vision: VisionProcessor | None = None) -> ChatFormat:
        """The template by name (``get_template``: built-in, ``auto`` or LLaMA-Factory's)."""
        return cls(tokenizer, get_template(template, tokenizer), default_system, enable_thinking, vision)

    @classmethod
    def of(cls, keys: FormatKeys, tokenizer: Any, vision: VisionProcessor | None = None) -> ChatFormat:
        """The format a config or run spec names (its ``template``, ``default_system``, ``enable_thinking``)."""
        return cls.named(tokenizer, keys.template, keys.default_system, keys.enable_thinking, vision)

    @classmethod
    def for_model(cls, cfg: Any, tokenizer: Any) -> ChatFormat:
        """A stage's format: ``of(cfg)`` with the model's image processor (None for a text-only model),
        capped by the config's ``image_max_pixels`` / ``image_min_pixels``."""
        vision = VisionProcessor.load(cfg.model_name_or_path, tokenizer, cfg.image_max_pixels, cfg.image_min_pixels)
        return cls.of(cfg, tokenizer, vision)

    def system(self, example: Example) -> str | None:
        """Row's system > ``default_system`` > (``None``) the template's built-in default."""
        return example.system if example.system else self.default_system

    def messages(self, example: Example) -> list[dict]:
        """The row's messages, ``<image>`` placeholders expanded to the model's image tokens."""
        return prompt_messages(example, self.vision)

    def segments(self, messages: list[dict], system: str | None, add_generation_prompt: bool) -> Segments:
        return self.template.segments(messages, system, add_generation_prompt, self.enable_thinking,
                                      tokenizer=self.tokenizer)

    def image_tokens(self, ids: list[int]) -> int:
        """How many of ``ids`` are the model's image token (0 on a text-only model)."""
        return 0 if self.vision is None else sum(1 for t in ids if t == self.vision.image_token_id)
