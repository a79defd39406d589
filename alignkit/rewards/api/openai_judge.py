"""The ``openai_judge`` preset: an LLM judge behind an OpenAI-compatible chat completions endpoint.

A judge's free-text score is noisy and often missing. Three calibrations, each one request key:

- ``score_format: json`` asks for ``{"score": N}`` through structured output (``response_format``
  with a JSON schema: OpenAI, vLLM and SGLang constrain decoding to it), so even a weak judge's
  reply holds a number.
- ``score_from: logprobs`` reads the score token's ``top_logprobs`` and takes the expected score
  over the scale, as G-Eval does (Liu et al., 2023, arXiv 2303.16634, section 2.3): a finer signal
  than the one sampled digit, and one that ties break on.
- ``judge_samples: n`` asks for n choices (``n``; at ``temperature`` > 0) and aggregates their
  scores (mean or median); their spread is logged as ``judge/score_std``.

A choice without a score is a failure: with one sample the item fails (``no score``); with several,
the item is scored from the rest and the unusable choices are counted (``judge/unparsed``).
"""

from __future__ import annotations

import json
import math
import re
from statistics import fmean, median, pstdev
from typing import Any

from alignkit.rewards.api.criteria import (
    CRITERION_LOG,
    Criterion,
    criteria_prompt,
    criteria_schema,
    weighted_score,
)
from alignkit.rewards.api.row_criteria import FALLBACK, decode
from alignkit.rewards.api.shape import Item, Preset, ReplyError, data_url, fill, images_of, kind_of

# judge_mode: listwise: one request per group. The responses are shuffled by the client and shown
# under anonymous ids (R1, R2, ...) so neither order nor identity can bias the judge (RULER, OpenPipe ART).
LISTWISE_RUBRIC = """You are a strict judge. Several responses answer the same prompt. Rate each from 0 to 10,
comparing them with each other.

[Prompt]
{prompt}

[Reference answer]
{label}

[Responses]
{responses}

Reply with a JSON object giving each response id its score, e.g. {"R1": 7, "R2": 3}."""

CALIBRATION_DEFAULTS: dict[str, Any] = {"score_format": "text", "score_from": "text", "judge_samples": 1,
                                        "judge_aggregate": "mean", "temperature": 0.0, "judge_mode": "pointwise",
                                        "criteria_mode": "holistic"}
TOP_LOGPROBS = 20  # the most OpenAI returns; enough to cover a 0-10 scale
MIN_SCORE_MASS = 0.05  # below this, a reply without a score token has no score distribution to speak of
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def score_schema(score_range: tuple[float, float] | None) -> dict[str, Any]:
    """``response_format`` asking for ``{"score": N}``; an integer scale becomes an enum, so a
    constrained decoder can only write a valid score."""
    score: dict[str, Any] = {"type": "number"}
    if score_range is not None and all(float(x).is_integer() for x in score_range) and score_range[1] - score_range[0] <= 100:
        score = {"type": "integer", "enum": list(range(int(score_range[0]), int(score_range[1]) + 1))}
    schema = {"type": "object", "properties": {"score": score}, "required": ["score"], "additionalProperties": False}
    return {"type": "json_schema", "json_schema": {"name": "judge_score", "strict": True, "schema": schema}}


class OpenAIJudgePreset(Preset):
    """One chat completion per sample; the score from its text, its JSON, or its log-probabilities."""

    def __init__(self, model: str, rubric: str, score_regex: str, score_format: str = "text",
                 score_from: str = "text", judge_samples: int = 1, judge_aggregate: str = "mean",
                 temperature: float = 0.0, score_range: tuple[float, float] | None = None,
                 judge_mode: str = "pointwise", listwise_rubric: str = LISTWISE_RUBRIC,
                 criteria: list[Criterion] | None = None, criteria_column: str | None = None,
                 criteria_mode: str = "holistic") -> None:
        super().__init__("openai_judge", max_batch=None if judge_mode == "listwise" else 1)
        self.listwise, self.listwise_rubric = judge_mode == "listwise", listwise_rubric
        self.criteria = criteria or []
        # Scored on criteria: the global ones, each row's own (criteria_column), or both.
        self.uses_criteria = bool(criteria) or bool(criteria_column)
        self.per_criterion = self.uses_criteria and criteria_mode == "per_criterion"
        self.model, self.rubric, self.pattern = model, rubric, re.compile(score_regex)
        self.score_format, self.score_from = score_format, score_from
        self.samples, self.aggregate, self.temperature = judge_samples, judge_aggregate, temperature
        self.score_range = score_range

    @classmethod
    def from_config(cls, cfg: Any) -> OpenAIJudgePreset:
        return cls(cfg.model or "", cfg.rubric, cfg.score_regex, cfg.score_format, cfg.score_from, cfg.judge_samples,
                   cfg.judge_aggregate, cfg.temperature, cfg.score_range, cfg.judge_mode, cfg.listwise_rubric,
                   cfg.criteria, cfg.criteria_column, cfg.criteria_mode)

    def criteria_of(self, item: Item) -> list[Criterion]:
        """The rubric ``item`` is judged on: its row's (merged with the global one when the row was
        loaded), else the global criteria, else a generic one (probe and canary samples, not dataset rows)."""
        if len(item) > 4 and item[4]:
            return decode(item[4])
        return self.criteria or FALLBACK

    def build(self, items: list[Item]) -> dict[str, Any]:
        if self.listwise:
            return self._build_group(items)
        (item,) = items
        text = fill(self.rubric, item)
        images = [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in images_of(item)]
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": [{"type": "text", "text": text}, *images] if images else text}],
            "temperature": self.temperature or 0,
        }
        if self.uses_criteria:  # the rubric's criteria replace the single score
            criteria = self.criteria_of(item)
            text = criteria_prompt(criteria, item, self.rubric)
            body["messages"][0]["content"] = [{"type": "text", "text": text}, *images] if images else text
            score = score_schema(self.score_range)["json_schema"]["schema"]["properties"]["score"]
            body["response_format"] = criteria_schema(criteria, score)
        elif self.score_format == "json":
            body["response_format"] = score_schema(self.score_range)
        if self.score_from == "logprobs":
            body |= {"logprobs": True, "top_logprobs": TOP_LOGPROBS}
        if self.samples > 1:
            body["n"] = self.samples
        return body

    def _build_group(self, items: list[Item]) -> dict[str, Any]:
        """One request for responses to one prompt (the client groups and shuffles them); scores
        come back as ``{"R1": N, ...}`` under a JSON schema that requires every id."""
        prompt, _, label = items[0][:3]
        listed = "\n\n".join(f"[R{i}]\n{it[1]}" for i, it in enumerate(items, 1))
        text = fill(self.listwise_rubric.replace("{responses}", "\0RESPONSES\0"), (prompt, "", label))
        text = text.replace("\0RESPONSES\0", listed)
        images = [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in images_of(items[0])]
        score = score_schema(self.score_range)["json_schema"]["schema"]["properties"]["score"]
        ids = [f"R{i}" for i in range(1, len(items) + 1)]
        schema = {"type": "object", "properties": dict.fromkeys(ids, score), "required": ids,
                  "additionalProperties": False}
        return {"model": self.model, "temperature": self.temperature or 0,
                "messages": [{"role": "user", "content": [{"type": "text", "text": text}, *images] if images else text}],
                "response_format": {"type": "json_schema",
                                    "json_schema": {"name": "judge_scores", "strict": True, "schema": schema}}}

    def _parse_group(self, data: Any, n: int) -> list[Any]:
        try:
            text = data["choices"][0]["message"]["content"]
            obj = json.loads(text)
        except (KeyError, IndexError, TypeError):
            raise ReplyError("wrong shape", f"expected choices[0].message.content, got {kind_of(data)}") from None
        except ValueError:
            raise ReplyError("no score", f"listwise reply is not JSON: {str(text)[-200:]!r}") from None
        ids = [f"R{i}" for i in range(1, n + 1)]
        if not isinstance(obj, dict) or not set(ids) <= set(obj):
            raise ReplyError("wrong count", f"listwise reply should score {', '.join(ids)}; got {str(text)[-200:]!r}")
        return [obj[i] for i in ids]

    def parse_items(self, data: Any, items: list[Item]) -> tuple[list[Any], dict[str, list[Any]]]:
        if not self.uses_criteria:
            return self.parse(data, len(items))
        (item,) = items
        try:
            text = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ReplyError("wrong shape", f"expected choices[0].message.content, got {kind_of(data)}") from None
        value, per = weighted_score(self.criteria_of(item), str(text), self.score_range)
        return [value], {f"{CRITERION_LOG}{k}": [v] for k, v in per.items()}

    def parse(self, data: Any, n: int) -> tuple[list[Any], dict[str, list[Any]]]:
        if self.listwise:
            return self._parse_group(data, n), {}
        if self.uses_criteria:  # without the item: judged on the global (or generic) rubric
            return self.parse_items(data, [("", "", None)])
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices:
            raise ReplyError("wrong shape", f"expected choices[0].message.content, got {kind_of(data)}")
        if self.samples == 1:
            return [self._choice_score(choices[0])], {}
        values, problems = [], []
        for choice in choices:
            try:
                v = self._choice_score(choice)
            except ReplyError as e:
                problems.append(e)
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                values.append(float(v))
            else:
                problems.append(ReplyError("non-numeric score", repr(v)[:80]))
        if not values:
            first = problems[0]
            raise ReplyError(first.kind, f"none of {len(choices)} judge samples had a score; first: {first.detail}")
        value = fmean(values) if self.aggregate == "mean" else median(values)
        return [value], {"judge/score_std": [pstdev(values)], "judge/unparsed": [len(problems)]}

    def _choice_score(self, choice: Any) -> Any:
        try:
            text = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ReplyError("wrong shape", f"expected choices[i].message.content, got {kind_of(choice)}") from None
        if not isinstance(text, str):
            raise ReplyError("wrong shape", f"choices[i].message.content is {kind_of(text)}")
        if self.score_from == "logprobs":
            return self._expected_score(choice, text)
        if self.score_format == "json":
            return _json_score(text)
        return self._regex_score(text)

    def _regex_score(self, text: str) -> float:
        matches = list(self.pattern.finditer(text))
        if not matches:
            raise ReplyError("no score", f"no match for {self.pattern.pattern!r} in reply {text[-200:]!r}")
        last = matches[-1]
        number = (last.group(1) if last.re.groups else last.group(0)).split("/", 1)[0].strip()
        try:
            return float(number)
        except ValueError:
            raise ReplyError("non-numeric score", f"matched {number!r} in reply {text[-200:]!r}") from None

    def _expected_score(self, choice: dict[str, Any], text: str) -> float:
        """G-Eval: sum of p(s) * s over the score values among the top log-probs at the score's position,
        renormalised over those values. That position is the first token that is a score; in a reply
        with none (a weak judge that started to chat), the first token, where the rubric asked for the
        score, if the scale's tokens hold at least ``MIN_SCORE_MASS`` of its probability there."""
        content = (choice.get("logprobs") or {}).get("content")
        if not isinstance(content, list) or not content:
            raise ReplyError("wrong shape", "score_from: logprobs but the reply has no choices[i].logprobs.content "
                                            "(does the server support logprobs?)")
        for entry in content:
            if self._scale_value(entry.get("token", "")) is not None and (weights := self._weights(entry)):
                return sum(v * p for v, p in weights.items()) / sum(weights.values())
        weights = self._weights(content[0])
        mass = sum(weights.values())
        if mass >= MIN_SCORE_MASS:
            return sum(v * p for v, p in weights.items()) / mass
        raise ReplyError("no score", f"no score token in the reply and {mass:.0%} of the first token's probability "
                                     f"on the scale; reply {text[-200:]!r}")

    def _weights(self, entry: dict[str, Any]) -> dict[float, float]:
        """Probability of each scale value among one position's top log-probs."""
        weights: dict[float, float] = {}
        for alt in entry.get("top_logprobs") or [entry]:
            v = self._scale_value(alt.get("token", ""))
            if v is not None and isinstance(alt.get("logprob"), (int, float)):
                weights[v] = weights.get(v, 0.0) + math.exp(alt["logprob"])
        return weights

    def _scale_value(self, token: str) -> float | None:
        """The score a token stands for (``" 7"`` -> 7.0), or None when it is not one on the scale."""
        t = token.strip()
        if not _NUMBER.fullmatch(t):
            return None
        v = float(t)
        lo, hi = self.score_range or (-math.inf, math.inf)
        return v if lo <= v <= hi else None


def _json_score(text: str) -> Any:
    try:
        obj = json.loads(text)
    except ValueError:
        raise ReplyError("no score", f"score_format: json but the reply is not JSON: {text[-200:]!r}") from None
    if not isinstance(obj, dict) or "score" not in obj:
        raise ReplyError("no score", f"score_format: json but the reply has no 'score': {text[-200:]!r}")
    return obj["score"]
