"""Response text clean-up before scoring: strip the thought of a reasoning model.

Reasoning models write ``<think>…</think>`` before the answer. A judge should see the answer
only; a response cut off *inside* the thought has no answer at all, and scoring the partial
thought as if it were one is what makes reward collapse on thinking models.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from alignkit.rewards.base import Score

DEFAULT_THINK_TAGS = ("<think>", "</think>")


def decode_for_reward(
    tokenizer: Any, rows: Sequence[Sequence[int]], include_special_tokens: bool = False, keep: Sequence[str] = ()
) -> list[str]:
    """Response token ids as the text a reward scores.

    Special tokens are dropped unless ``include_special_tokens``, except the tokens in ``keep``
    (the think tags): a tokenizer that marks ``<think>``/``</think>`` as special would otherwise
    lose the tags, and a thought cut off by the token budget would be scored as the answer.
    """
    if include_special_tokens:
        return [tokenizer.decode(list(r), skip_special_tokens=False) for r in rows]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    drop = special - {tokenizer.convert_tokens_to_ids(t) for t in keep}
    return [tokenizer.decode([i for i in r if i not in drop], skip_special_tokens=False) for r in rows]


def joint_responses(
    tokenizer: Any, query_rows: Sequence[Sequence[int]], response_rows: Sequence[Sequence[int]]
) -> list[str]:
    """Each response as the text that follows its prompt in ONE decode of prompt + response ids,
    special tokens kept: what LLaMA-Factory and OpenRLHF send (``decode(query + response)``).

    Decoding the two parts apart is the same on byte-level BPE, but a SentencePiece-style
    tokenizer drops the leading space of a sequence's first word, so ``decode(response)`` after
    ``[/INST]`` loses the space that the joint decode keeps. Where the prompt's own decode is not a
    prefix of the joint one (a clean-up rule merging across the seam), the response starts after
    their common prefix.
    """
    out = []
    for query, response in zip(query_rows, response_rows, strict=True):
        prompt = tokenizer.decode(list(query), skip_special_tokens=False)
        full = tokenizer.decode([*query, *response], skip_special_tokens=False)
        seam = len(prompt) if full.startswith(prompt) else len(os.path.commonprefix([prompt, full]))
        out.append(full[seam:])
    return out


def strip_think(text: str, tags: Sequence[str] = DEFAULT_THINK_TAGS) -> tuple[str, bool]:
    """Remove thoughts from ``text``; return ``(answer, truncated)``.

    ``truncated`` is true when an opening tag has no closing tag after it (generation stopped
    inside the thought). A closing tag without an opening one is also handled: chat templates
    such as Qwen3's put ``<think>`` in the prompt, so the response starts inside the thought.
    """
    open_tag, close_tag = tags
    last_open = text.rfind(open_tag)
    last_close = text.rfind(close_tag)
    if last_open > last_close:
        return text[:last_open].strip(), True
    if last_close == -1:
        return text.strip(), False
    # Everything up to the last closing tag is thought (possibly several blocks).
    head, answer = text[:last_close], text[last_close + len(close_tag) :]
    first_open = head.find(open_tag)
    prefix = head[:first_open] if first_open != -1 else ""
    return (prefix + answer).strip(), False


def is_think_truncated(text: str, tags: Sequence[str] = DEFAULT_THINK_TAGS) -> bool:
    """True when the response was cut off inside a thought (opening tag, no closing tag)."""
    return text.rfind(tags[0]) > text.rfind(tags[1])


def think_truncated_frac(responses: Sequence[str], tags: Sequence[str] = DEFAULT_THINK_TAGS) -> float:
    """Fraction of ``responses`` cut off inside a thought (metric ``rollout/think_truncated_frac``)."""
    if not responses:
        return 0.0
    return sum(is_think_truncated(r, tags) for r in responses) / len(responses)


@dataclass(frozen=True)
class ThinkFilter:
    """Strip thoughts and decide what a truncated thought scores.

    ``on_truncated="score"`` gives such a response ``truncated_score`` without asking the
    judge; ``"fail"`` turns it into a failure (handled by the ``on_failure`` policy).
    """

    tags: tuple[str, str] = DEFAULT_THINK_TAGS
    on_truncated: str = "score"
    truncated_score: float = 0.0

    def apply(self, responses: Sequence[str]) -> tuple[list[str], list[Score | None]]:
        """Return the answers to score and, per response, a settled score (or ``None``).

        A settled score is the truncated-thought score or failure; those responses are not
        sent to the reward source.
        """
        texts: list[str] = []
        settled: list[Score | None] = []
        for response in responses:
            answer, truncated = strip_think(response, self.tags)
            texts.append(answer)
            if not truncated:
                settled.append(None)
            elif self.on_truncated == "fail":
                settled.append(Score.failure("think truncated: the response ends inside a thought"))
            else:
                settled.append(Score(self.truncated_score))
        return texts, settled
