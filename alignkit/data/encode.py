"""Examples to token ids: supervised sequences with label masks, prompts, preference pairs.

Each template segment is tokenised on its own (``add_special_tokens=False``; BOS, where a
model has one, is part of the template text), so a label mask is exact: a token is either
inside an assistant turn's content + end-of-turn marker or it is not.

With ``vision`` (a VL model's ``VisionProcessor``), a row's ``<image>`` placeholders become the
model's image tokens before templating, and cutting to ``cutoff_len`` must keep them all.
"""

from __future__ import annotations

import logging
from typing import Any

from alignkit.data.loader import Example
from alignkit.data.templates import Segments
from alignkit.data.vision import VisionProcessor, check_image_tokens, prompt_messages

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def _system(example: Example, default_system: str | None) -> str | None:
    """Row's system > ``default_system`` > (``None``) the template's built-in default."""
    return example.system if example.system else default_system


def _tokenize(tokenizer: Any, segments: Segments) -> tuple[list[int], list[int]]:
    input_ids: list[int] = []
    labels: list[int] = []
    for text, supervised in segments:
        ids = tokenizer.encode(text, add_special_tokens=False)
        input_ids += ids
        labels += ids if supervised else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def encode_supervised(
    tokenizer: Any, template: Any, example: Example,
    cutoff_len: int, default_system: str | None, enable_thinking: bool | None, vision: VisionProcessor | None = None,
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` for a conversation ending with an assistant turn.

    Every assistant turn's content and end-of-turn token are supervised; everything else is
    ``-100``. Longer sequences keep their first ``cutoff_len`` tokens; the labels may then be
    all ``-100`` (``encode_supervised_examples`` drops such examples).
    """
    system = _system(example, default_system)
    messages = prompt_messages(example, vision)
    segments = template.segments(messages, system, False, enable_thinking, tokenizer=tokenizer)
    input_ids, labels = _tokenize(tokenizer, segments)
    check_image_tokens(example, vision, input_ids[:cutoff_len], _image_tokens(input_ids, vision))
    return input_ids[:cutoff_len], labels[:cutoff_len]


def _image_tokens(ids: list[int], vision: VisionProcessor | None) -> int:
    return 0 if vision is None else sum(1 for t in ids if t == vision.image_token_id)


def encode_supervised_examples(
    tokenizer: Any, template: Any, examples: list[Example],
    cutoff_len: int, default_system: str | None, enable_thinking: bool | None, vision: VisionProcessor | None = None,
) -> list[dict[str, Any]]:
    """``encode_supervised`` over a dataset, dropping (with a warning) examples that
    ``cutoff_len`` leaves without a single supervised token. Rows with images keep their paths
    (``images``) for the collator, which makes the pixel tensors batch by batch."""
    features = []
    for ex in examples:
        input_ids, labels = encode_supervised(
            tokenizer, template, ex, cutoff_len, default_system, enable_thinking, vision
        )
        if any(label != IGNORE_INDEX for label in labels):
            features.append({"input_ids": input_ids, "labels": labels, **({"images": ex.images} if ex.images else {})})
    if dropped := len(examples) - len(features):
        logger.warning(
            "dropped %d of %d examples whose prompt fills cutoff_len=%d (no supervised token left); "
            "raise cutoff_len to keep them",
            dropped,
            len(examples),
            cutoff_len,
        )
    return features


def encode_prompt(
    tokenizer: Any, template: Any, example: Example,
    cutoff_len: int, default_system: str | None, enable_thinking: bool | None, vision: VisionProcessor | None = None,
) -> list[int]:
    """Prompt ids ending with the generation prompt; too-long prompts keep their END, since
    the latest user turn and the generation prompt are what the response depends on."""
    if example.messages and example.messages[-1]["role"] == "assistant":
        raise ValueError(f"{example.source}: a prompt must end with a user turn; load it with kind='prompt'")
    system = _system(example, default_system)
    segments = template.segments(prompt_messages(example, vision), system, True, enable_thinking, tokenizer=tokenizer)
    input_ids, _ = _tokenize(tokenizer, segments)
    check_image_tokens(example, vision, input_ids[-cutoff_len:], _image_tokens(input_ids, vision))
    return input_ids[-cutoff_len:]


def _prompt_response(
    tokenizer: Any, template: Any, messages: list[dict], response: str, system: str | None, enable_thinking: bool | None
) -> tuple[list[int], list[int]]:
    """Prompt ids (through the generation prompt) and response ids (through end-of-turn)."""
    messages = [*messages, {"role": "assistant", "content": response}]
    segments = template.segments(messages, system, False, enable_thinking, tokenizer=tokenizer)
    last = max(i for i, (_, supervised) in enumerate(segments) if supervised)
    prompt_ids, _ = _tokenize(tokenizer, segments[:last])
    response_ids, _ = _tokenize(tokenizer, segments[last : last + 1])
    return prompt_ids, response_ids


def encode_responses(
    tokenizer: Any, template: Any, example: Example, responses: list[str],
    cutoff_len: int, default_system: str | None, enable_thinking: bool | None, vision: VisionProcessor | None = None,
) -> tuple[list[int], list[list[int]]]:
    """The prompt's ids (through the generation prompt) and each response's ids (through end-of-turn).

    Over ``cutoff_len``, the responses get at least half of it and the shared prompt keeps
    its end; a cut response keeps its last (end-of-turn) token, because a reward model reads
    its score there.
    """
    system = _system(example, default_system)
    messages = prompt_messages(example, vision)
    parts = [_prompt_response(tokenizer, template, messages, r, system, enable_thinking) for r in responses]
    prompt, answers = parts[0][0], [ids for _, ids in parts]
    n_image = _image_tokens(prompt, vision)
    longest = max(len(a) for a in answers)
    if len(prompt) + longest > cutoff_len:
        response_budget = min(longest, max(cutoff_len - len(prompt), cutoff_len // 2))
        prompt_budget = cutoff_len - response_budget
        prompt = prompt[-prompt_budget:] if prompt_budget else []
        answers = [_cut(a, response_budget) for a in answers]
    check_image_tokens(example, vision, prompt, n_image)
    return prompt, answers


def encode_pair(
    tokenizer: Any, template: Any, example: Example,
    cutoff_len: int, default_system: str | None, enable_thinking: bool | None, vision: VisionProcessor | None = None,
) -> tuple[list[int], list[int]]:
    """Full ``(chosen_ids, rejected_ids)`` sequences: prompt + response + end-of-turn, cut to
    ``cutoff_len`` as ``encode_responses`` does."""
    if example.chosen is None or example.rejected is None:
        raise ValueError(f"{example.source}: encode_pair needs an example with chosen and rejected")
    prompt, (chosen, rejected) = encode_responses(tokenizer, template, example, [example.chosen, example.rejected],
                                                  cutoff_len, default_system, enable_thinking, vision)
    return prompt + chosen, prompt + rejected


def _cut(response_ids: list[int], budget: int) -> list[int]:
    if len(response_ids) <= budget:
        return response_ids
    return response_ids[: budget - 1] + response_ids[-1:]
