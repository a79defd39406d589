"""A trained reward model as a ``RewardSource``.

Two ways to hold it during PPO (``reward_model_type``):

- ``lora``: the RM adapter is loaded as a second adapter (``"reward"``) on the policy's own
  base, and its score head separately: one base model in memory. Scoring switches the active
  adapter for the duration of a forward pass, so it must not overlap a policy forward pass on
  another thread: it holds ``policy_model.adapter_lock`` (a ``threading.Lock`` the trainer also
  takes around its own forward passes) when the policy model has one.
- ``full``: a separate model directory with its own architecture, tokenizer and template;
  text is re-tokenized for it. It can sit on its own device (``reward_model_device``).

Either way, a response is scored exactly as the RM saw pairs in training: the prompt as a user
turn, the response as the assistant turn, the RM's recorded template and system prompt, read
at the end-of-turn token.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from alignkit.data.chat_format import ChatFormat
from alignkit.data.encode import encode_pair
from alignkit.data.loader import Example
from alignkit.data.templates import get_template
from alignkit.models.loading import check_model_dir, load_tokenizer, model_dtype
from alignkit.models.reward_model import (
    META_FILE,
    RewardModel,
    RewardModelError,
    load_reward_model,
    load_score_head,
    read_meta,
    score_sequences,
)
from alignkit.rewards.base import Score, ScoreMeta
from alignkit.rewards.spec import RewardContext, RewardSpec

logger = logging.getLogger(__name__)

REWARD_ADAPTER = "reward"


def encode_for_scoring(
    tokenizer: Any,
    template: Any,
    prompt: str,
    response: str,
    cutoff_len: int,
    default_system: str | None = None,
    enable_thinking: bool | None = None,
) -> list[int]:
    """Token ids of (prompt, response) exactly as RM training encodes a chosen sequence."""
    ex = Example(messages=[{"role": "user", "content": prompt}], chosen=response, rejected=response)
    return encode_pair(ChatFormat(tokenizer, template, default_system, enable_thinking), ex, cutoff_len)[0]


class ModelReward:
    """Scores (prompt, response) pairs with a reward model, under ``no_grad``, in batches.

    ``context`` is entered around each batch of forward passes (the ``lora`` type switches to
    the reward adapter there). The computation is synchronous inside the async ``score``; on
    the trainer's background scoring thread it overlaps only with non-model work.
    """

    def __init__(
        self,
        rm: RewardModel,
        tokenizer: Any,
        template: str = "auto",
        cutoff_len: int = 1024,
        default_system: str | None = None,
        enable_thinking: bool | None = None,
        batch_size: int = 8,
        context: Callable[[], AbstractContextManager] = nullcontext,
    ):
        self.rm = rm
        self.tokenizer = tokenizer
        self.template = get_template(template, tokenizer)
        self.cutoff_len = cutoff_len
        self.default_system = default_system
        self.enable_thinking = enable_thinking
        self.batch_size = batch_size
        self.context = context

    @classmethod
    def from_dir(
        cls,
        path: str | Path,
        base_model: str | None = None,
        device: str | None = None,
        dtype: torch.dtype = torch.float32,
        cutoff_len: int | None = None,
        batch_size: int = 8,
    ) -> ModelReward:
        """A standalone reward model (either layout), formatted as recorded at training time."""
        rm, tokenizer, meta = load_reward_model(path, base_model, dtype, device)
        return cls(rm, tokenizer, meta.get("template", "auto"), cutoff_len or meta.get("cutoff_len", 1024),
                   meta.get("default_system"), meta.get("enable_thinking"), batch_size)

    def score_texts(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        seqs = [
            encode_for_scoring(self.tokenizer, self.template, p, r, self.cutoff_len, self.default_system,
                               self.enable_thinking)
            for p, r in zip(prompts, responses, strict=True)
        ]
        with self.context():
            return score_sequences(self.rm, seqs, self.tokenizer.pad_token_id, self.batch_size)

    async def score(
        self, prompts: Sequence[str], responses: Sequence[str], meta: ScoreMeta | None = None
    ) -> list[Score]:
        try:
            values = self.score_texts(prompts, responses)
        except (RuntimeError, ValueError) as e:  # e.g. out of memory: every sample of the call failed
            return [Score.failure(f"reward model error: {type(e).__name__}: {e}")] * len(prompts)
        return [Score(v) if math.isfinite(v) else Score.failure(f"non-finite score: {v}") for v in values]

    async def aclose(self) -> None:
        return None

    def metrics(self) -> dict[str, float]:
        return {}  # failures are counted by the CountFailures wrapper


def build_model_reward(spec: RewardSpec, context: RewardContext, policy_model=None) -> ModelReward:
    """``reward_model_type: lora`` → adapter on the policy's base; ``full`` → its own model.

    ``policy_model`` is the trainer's ``ActorCritic`` (a ``lora`` reward model needs it).
    """
    key = "reward_model_adapters" if spec.reward_model_adapters else "reward_model"
    path = check_model_dir(spec.reward_dir, key)
    meta = read_meta(path)
    dtype = model_dtype(context.bf16, context.fp16)
    batch_size = context.batch_size
    if spec.reward_model_type == "full":
        device = spec.reward_model_device or context.device or (
            str(next(policy_model.parameters()).device) if policy_model is not None else None
        )
        return ModelReward.from_dir(path, spec.reward_base, device=device, dtype=dtype,
                                    cutoff_len=context.cutoff_len, batch_size=batch_size)
    if spec.reward_model_type != "lora":
        raise ValueError(f"reward_model_type {spec.reward_model_type!r} is not a trained reward model")
    if policy_model is None or not getattr(policy_model, "is_lora", False):
        raise ValueError(
            "reward_model_type: lora puts the reward adapter on the policy's base and needs a LoRA policy "
            "(finetuning_type: lora); with full fine-tuning use reward_model_type: full"
        )
    if not (path / "adapter_config.json").is_file():
        raise RewardModelError(
            f"reward_model_type: lora, but {path} is not a LoRA reward model (no adapter_config.json); "
            "for a full reward model directory set reward_model_type: full"
        )
    _check_same_base(context, path, meta)
    lm = policy_model.lm
    head = load_score_head(path, lm.config.get_text_config().hidden_size)
    modes = [(m, m.training) for m in lm.modules()]
    device = next(lm.parameters()).device
    lm.load_adapter(str(path), adapter_name=REWARD_ADAPTER, torch_device=str(device))
    # peft's load_adapter (inference mode) calls eval() on the whole model, policy included.
    for m, mode in modes:
        m.training = mode
    head.to(device)
    lock = getattr(policy_model, "adapter_lock", None)
    if lock is None:
        logger.warning("the policy model has no adapter_lock: lora reward scoring must not overlap policy forward passes")
        lock = threading.Lock()
    tokenizer = load_tokenizer(str(path) if (path / "tokenizer_config.json").is_file() else context.base_model)
    return ModelReward(RewardModel(lm, head), tokenizer, meta.get("template", context.template), context.cutoff_len,
                       meta.get("default_system", context.default_system),
                       meta.get("enable_thinking", context.enable_thinking),
                       batch_size, context=lambda: _reward_adapter(policy_model, lock))


@contextmanager
def _reward_adapter(policy_model, lock: threading.Lock) -> Iterator[None]:
    """Hold the adapter lock; run with the reward adapter active and dropout off; restore both.

    ``ActorCritic._adapter`` switches back to the policy adapter and restores every
    ``requires_grad`` flag (peft's ``set_adapter`` flips them). Train/eval flags are restored
    here: the RM scores without dropout while the policy may be in training mode.
    """
    with lock:
        modes = [(m, m.training) for m in policy_model.lm.modules()]
        policy_model.lm.eval()
        try:
            with policy_model.use_adapter(REWARD_ADAPTER):
                yield
        finally:
            for m, mode in modes:
                m.training = mode


def _check_same_base(context: RewardContext, path: Path, meta: dict) -> None:
    """The RM adapter only means something on the base it was trained on."""
    base = context.base_model
    recorded = meta.get("base_model")
    if recorded is None:
        logger.warning("%s has no %s; cannot check it was trained on %s", path, META_FILE, base)
        return
    if base is None or Path(recorded).resolve() != Path(base).resolve():
        same_config = base is not None and (Path(recorded) / "config.json").is_file() and (
            (Path(recorded) / "config.json").read_text() == (Path(base) / "config.json").read_text()
        )
        if (Path(recorded) / "config.json").is_file() and not same_config:
            raise RewardModelError(
                f"reward model {path} was trained on {recorded}, but the policy's base is {base}: "
                "a LoRA reward adapter only works on its own base. Retrain the RM with model_name_or_path: "
                f"{base}, or use reward_model_type: full with a full reward model"
            )
        logger.warning("reward model %s was trained on %s; using it on %s (same config)", path, recorded, base)
    if list(meta.get("merged_adapters") or []) != list(context.adapters):
        logger.warning(
            "reward model %s was trained on base + %s, the policy's base is base + %s (merged adapters); "
            "its scores may drift", path, meta.get("merged_adapters") or "nothing", list(context.adapters) or "nothing"
        )
