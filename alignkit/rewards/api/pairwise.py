"""``judge_mode: pairwise``: each response of a group compared with each other one, in both orders.

LLM judges prefer the answer they read first (or second) regardless of content (Zheng et al.,
"Judging LLM-as-a-Judge", arXiv 2306.05685, section 3.3). Asking about every pair in both orders
cancels that: a judge that always picks A gives every response the same win rate, 0.5. A response's
score is its win rate over the comparisons that came back (a tie counts half), in [0, 1]; a failed
comparison leaves that pair out, and a response with no comparison left fails. Costs k(k-1) requests
for a group of k (12 for 4), against k pointwise and 1 listwise.
"""

from __future__ import annotations

import json
import re
from typing import Any

from alignkit.rewards.api.shape import Item, ReplyError, kind_of

PAIRWISE_RUBRIC = """You are a strict judge. Two responses answer the same prompt. Which one is better?

[Prompt]
{prompt}

[Reference answer]
{label}

[Response A]
{response_a}

[Response B]
{response_b}

Reply with a JSON object: {"winner": "A"}, {"winner": "B"} or {"winner": "tie"}."""

_FIELDS = re.compile(r"\{(prompt|label|response_a|response_b)\}")
_WIN = {"A": 1.0, "B": 0.0, "tie": 0.5}  # what the comparison gives response A
SCHEMA = {"type": "json_schema", "json_schema": {"name": "judge_winner", "strict": True, "schema": {
    "type": "object", "properties": {"winner": {"type": "string", "enum": list(_WIN)}}, "required": ["winner"],
    "additionalProperties": False}}}


def pair_body(model: str, rubric: str, a: Item, b: Item, temperature: float) -> dict[str, Any]:
    """The request comparing ``a`` (shown first) with ``b``; the fields are filled in one pass."""
    values = {"prompt": a[0], "label": a[2] or "", "response_a": a[1], "response_b": b[1]}
    text = _FIELDS.sub(lambda m: values[m.group(1)], rubric)
    return {"model": model, "temperature": temperature or 0, "response_format": SCHEMA,
            "messages": [{"role": "user", "content": text}]}


def parse_pair(data: Any) -> float:
    """What the comparison gives response A: 1 (A wins), 0 (B wins) or 0.5 (tie)."""
    try:
        text = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ReplyError("wrong shape", f"expected choices[0].message.content, got {kind_of(data)}") from None
    try:
        winner = json.loads(text)["winner"]
    except (ValueError, TypeError, KeyError):
        raise ReplyError("no score", f"pairwise reply has no winner: {str(text)[-200:]!r}") from None
    if winner not in _WIN:
        raise ReplyError("no score", f"pairwise winner should be A, B or tie, got {winner!r}")
    return _WIN[winner]


def ordered_pairs(k: int) -> list[tuple[int, int]]:
    """Every (first shown, second shown) pair of a group of ``k``: both orders of each pair."""
    return [(i, j) for i in range(k) for j in range(k) if i != j]


def win_rates(k: int, results: list[tuple[int, int, float | None]]) -> list[float | None]:
    """Each response's share of the comparisons it won (``None``: no comparison came back).
    ``results``: (first, second, what it gave the first) per comparison, ``None`` when it failed."""
    won, played = [0.0] * k, [0] * k
    for i, j, a in results:
        if a is None:
            continue
        won[i] += a
        won[j] += 1.0 - a
        played[i] += 1
        played[j] += 1
    return [won[i] / played[i] if played[i] else None for i in range(k)]
