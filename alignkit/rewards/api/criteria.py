"""``reward_api.criteria``: a rubric of weighted criteria, judged in one call (holistic).

Rubrics as Rewards (Gunjal et al., arXiv 2507.17746) scores a response on explicit, weighted
criteria instead of one Likert number, and reports up to 31% better results with them. Here the
criteria are compiled into the judge prompt, the judge returns ``{"<criterion>": N, ...}`` under a
JSON schema that requires every criterion, and the score is the weighted mean. Each criterion's
score is logged as ``judge/criterion/<name>``. A reply that misses a criterion, or scores one off
``score_range``, fails the sample: a weighted mean over the criteria that happened to parse would
be a different rubric.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from alignkit.rewards.api.shape import JUDGE_INPUTS, Item, ReplyError, fill, kind_of

CRITERIA_RUBRIC = """You are a strict judge. Rate the response on each criterion below, from 0 to 10.

""" + JUDGE_INPUTS + """

[Criteria]
{criteria}

Reply with a JSON object giving each criterion its score, e.g. {example}."""

CRITERION_LOG = "judge/criterion/"  # + a criterion's name: its scores, logged as a mean and kept per sample


class Criterion(BaseModel):
    """One line of the rubric."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Key of its score in the reply and the metric.")
    weight: float = Field(1.0, gt=0, description="Its share of the score (weights are normalised).")
    description: str = Field(min_length=1, description="What the judge checks, in one sentence.")


def criteria_prompt(criteria: list[Criterion], item: Item, template: str = CRITERIA_RUBRIC) -> str:
    listed = "\n".join(f"- {c.name} (weight {c.weight:g}): {c.description}" for c in criteria)
    example = json.dumps({c.name: 7 for c in criteria[:2]})
    # The sample first (its text is never re-scanned), then the criteria the config wrote.
    text = fill(template.replace("{criteria}", "\0C\0").replace("{example}", "\0E\0"), item)
    return text.replace("\0C\0", listed).replace("\0E\0", example)


def criteria_schema(criteria: list[Criterion], score: dict[str, Any]) -> dict[str, Any]:
    names = [c.name for c in criteria]
    schema = {"type": "object", "properties": dict.fromkeys(names, score), "required": names,
              "additionalProperties": False}
    return {"type": "json_schema", "json_schema": {"name": "judge_criteria", "strict": True, "schema": schema}}


def weighted_score(criteria: list[Criterion], text: str, score_range: tuple[float, float] | None
                   ) -> tuple[float, dict[str, float]]:
    """The weighted mean of the criteria's scores in a JSON reply, and each criterion's score."""
    try:
        obj = json.loads(text)
    except ValueError:
        raise ReplyError("no score", f"criteria reply is not JSON: {text[-200:]!r}") from None
    if not isinstance(obj, dict):
        raise ReplyError("wrong shape", f"criteria reply should be an object, got {kind_of(obj)}")
    scores = {}
    for c in criteria:
        v = obj.get(c.name)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise ReplyError("no score", f"criterion {c.name!r} has no numeric score in {text[-200:]!r}")
        if score_range is not None and not score_range[0] <= v <= score_range[1]:
            raise ReplyError("out of range", f"criterion {c.name!r} scored {v:g}, not in {list(score_range)}")
        scores[c.name] = float(v)
    total = sum(c.weight for c in criteria)
    return sum(c.weight * scores[c.name] for c in criteria) / total, scores


_NAME = re.compile(r"^- ([A-Za-z_][A-Za-z0-9_]*) \(weight ", re.MULTILINE)


def listed_criteria(prompt_text: str) -> list[str]:
    """The criterion names a compiled prompt lists (the judge server reads them back)."""
    return _NAME.findall(prompt_text)
