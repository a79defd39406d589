"""Examples to token ids: supervised sequences with label masks, prompts, preference pairs.

Each template segment is tokenised on its own (``add_special_tokens=False``; BOS, where a
model has one, is part of the template text), so a label mask is exact: a token is either
inside an assistant turn's content + end-of-turn marker or it is not.

Every encoder takes a ``ChatFormat`` (tokenizer, template, system prompt, thinking, vision).
With ``fmt.vision`` (a VL model's ``VisionProcessor``), a row's ``<image>`` placeholders become the
model's image tokens before templating, and cutting to ``cutoff_len`` must keep them all.
"""

from __future__ import annotations

import logging
from typing import Any

from alignkit.data.chat_format import ChatFormat
from alignkit.data.loader import Example
from alignkit.data.templates import Segments
from alignkit.data.vision import check_image_tokens

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def _tokenize(tokenizer: Any, segments: Segments) -> tuple[list[int], list[int]]:
    input_ids: list[int] = []
    labels: list[int] = []
    for text, supervised in segments:
        ids = tokenizer.encode(text, add_special_tokens=False)
        input_ids += ids
        labels += ids if supervised else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def encode_supervised(fmt: ChatFormat, example: Example, cutoff_len: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` for a conversation ending with an assistant turn.

    Every assistant turn's content and end-of-turn token are supervised; everything else is
    ``-100``. Longer sequences keep their first ``cutoff_len`` tokens; the labels may then be
    all ``-100`` (``encode_supervised_examples`` drops such examples).
    """
    segments = fmt.segments(fmt.messages(example), fmt.system(example), False)
    input_ids, labels = _tokenize(fmt.tokenizer, segments)
    check_image_tokens(example, fmt.vision, input_ids[:cutoff_len], fmt.image_tokens(input_ids))
    return input_ids[:cutoff_len], labels[:cutoff_len]


def encode_supervised_examples(fmt: ChatFormat, examples: list[Example], cutoff_len: int) -> list[dict[str, Any]]:
    """``encode_supervised`` over a dataset, dropping (with a warning) examples that
    ``cutoff_len`` leaves without a single supervised token. Rows with images keep their paths
    (``images``) for the collator, which makes the pixel tensors batch by batch."""
    features = []
    for ex in examples:
        input_ids, labels = encode_supervised(fmt, ex, cutoff_len)
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


def encode_prompt(fmt: ChatFormat, example: Example, cutoff_len: int) -> list[int]:
    """Prompt ids ending with the generation prompt; too-long prompts keep their END, since
    the latest user turn and the generation prompt are what the response depends on."""
    if example.messages and example.messages[-1]["role"] == "assistant":
        raise ValueError(f"{example.source}: a prompt must end with a user turn; load it with kind='prompt'")
    segments = fmt.segments(fmt.messages(example), fmt.system(example), True)
    input_ids, _ = _tokenize(fmt.tokenizer, segments)
    check_image_tokens(example, fmt.vision, input_ids[-cutoff_len:], fmt.image_tokens(input_ids))
    return input_ids[-cutoff_len:]


def _prompt_response(
    fmt: ChatFormat, messages: list[dict], response: str, system: str | None
) -> tuple[list[int], list[int]]:
    """Prompt ids (through the generation prompt) and response ids (through end-of-turn)."""
    messages = [*messages, {"role": "assistant", "content": response}]
    segments = fmt.segments(messages, system, False)
    last = max(i for i, (_, supervised) in enumerate(segments) if supervised)
    prompt_ids, _ = _tokenize(fmt.tokenizer, segments[:last])
    response_ids, _ = _tokenize(fmt.tokenizer, segments[last : last + 1])
    return prompt_ids, response_ids


def encode_responses(
    fmt: ChatFormat, example: Example, responses: list[str], cutoff_len: int
) -> tuple[list[int], list[list[int]]]:
    """The prompt's ids (through the generation prompt) and each response's ids (through end-of-turn).

    Over ``cutoff_len``, the responses get at least half of it and the shared prompt keeps
    its end; a cut response keeps its last (end-of-turn) token, because a reward model reads
    its score there.
    """
    system, messages = fmt.system(example), fmt.messages(example)
    parts = [_prompt_response(fmt, messages, r, system) for r in responses]
    prompt, answers = parts[0][0], [ids for _, ids in parts]
    n_image = fmt.image_tokens(prompt)
    longest = max(len(a) for a in answers)
    if len(prompt) + longest > cutoff_len:
        response_budget = min(longest, max(cutoff_len - len(prompt), cutoff_len // 2))
        prompt_budget = cutoff_len - response_budget
        prompt = prompt[-prompt_budget:] if prompt_budget else []
        answers = [_cut(a, response_budget) for a in answers]
    check_image_tokens(example, fmt.vision, prompt, n_image)
    return prompt, answers


def encode_pair(fmt: ChatFormat, example: Example, cutoff_len: int) -> tuple[list[int], list[int]]:
    """Full ``(chosen_ids, rejected_ids)`` sequences: prompt + response + end-of-turn, cut to
    ``cutoff_len`` as ``encode_responses`` does."""
    if example.chosen is None or example.rejected is None:
        raise ValueError(f"{example.source}: encode_pair needs an example with chosen and rejected")
    prompt, (chosen, rejected) = encode_responses(fmt, example, [example.chosen, example.rejected], cutoff_len)
    return prompt + chosen, prompt + rejected


def _cut(response_ids: list[int], budget: int) -> list[int]:
    if len(response_ids) <= budget:
        return response_ids
    return response_ids[: budget - 1] + response_ids[-1:]
