"""Request shapes of the HTTP judges alignkit speaks (``reward_api.preset``).

A preset turns a batch of ``(prompt, response, label, images)`` items into a JSON body and a JSON
reply into one raw value per item. ``images`` are the prompt's image paths (``()`` for text): the
alignkit shape sends them as an ``images`` list, ``custom`` wherever its payload says ``"{images}"``,
and ``openai_judge`` as ``image_url`` content parts holding ``data:`` URLs (what OpenAI-compatible
servers accept; they cannot read the trainer's disk). It never validates values (the client does that the same
way for every preset) and raises ``ReplyError`` when the reply as a whole is unusable.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import Any

from alignkit.rewards.api.openai_judge import CALIBRATION_DEFAULTS, OpenAIJudgePreset
from alignkit.rewards.api.shape import JUDGE_INPUTS, Item, Preset, ReplyError, fill, images_of, kind_of

_PATH_TOKEN = re.compile(r"([^.\[\]]+)|\[(\*|\d+)\]")
_CONDITION = re.compile(r"^\s*([\w.\[\]*-]+)\s*(==|!=)\s*(.+?)\s*$")

DEFAULT_RUBRIC = """You are a strict judge. Rate how well the response answers the prompt, from 0 to 10.

""" + JUDGE_INPUTS + """

Give a one-sentence justification, then the score as the last number of your reply."""

# A number, optionally written as a fraction of the scale ("3/10"): the score is the numerator.
DEFAULT_SCORE_REGEX = r"-?\d+(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?"


UNSUCCESSFUL = "unsuccessful reply"  # the kind of a reply whose success condition is not met


def render(template: Any, item: Item) -> Any:
    """Fill placeholders throughout a JSON template; a string that is only ``"{label}"`` keeps ``null``,
    and one that is only ``"{images}"`` becomes the list of the prompt's image paths."""
    if isinstance(template, dict):
        return {k: render(v, item) for k, v in template.items()}
    if isinstance(template, list):
        return [render(v, item) for v in template]
    if isinstance(template, str):
        if template == "{label}":
            return item[2]
        if template == "{images}":
            return images_of(item)
        return fill(template, item)
    return template


def parse_path(path: str) -> list[str | int]:
    """``"results[*].score"`` -> ``["results", "*", "score"]``; ``"a[0]"`` -> ``["a", 0]``."""
    tokens: list[str | int] = []
    for part in path.split("."):
        pos_in = 0
        for m in _PATH_TOKEN.finditer(part):
            if m.start() != pos_in:
                break
            name, index = m.groups()
            tokens.append(name if name is not None else ("*" if index == "*" else int(index)))
            pos_in = m.end()
        if not part or pos_in != len(part):
            raise ValueError(
                f"bad path {path!r} near {part!r}: use names, [N] and [*], e.g. results[*].score"
            )
    return tokens


def resolve(data: Any, tokens: list[str | int], path: str) -> Any:
    for i, token in enumerate(tokens):
        if token == "*":
            if not isinstance(data, list):
                raise ReplyError("wrong shape", f"{path}: expected a list before [*], got {kind_of(data)}")
            return [resolve(x, tokens[i + 1 :], path) for x in data]
        if isinstance(token, int):
            if not isinstance(data, list) or token >= len(data):
                raise ReplyError("wrong shape", f"{path}: no element [{token}] in {kind_of(data)}")
        elif not isinstance(data, dict) or token not in data:
            raise ReplyError("wrong shape", f"reply has no {path!r} (no key {token!r} in {kind_of(data)})")
        data = data[token]
    return data


@dataclass(frozen=True)
class Condition:
    """``success == true``: a path in the reply compared with a JSON literal."""

    text: str
    tokens: list[str | int]
    op: str
    expected: Any

    @classmethod
    def parse(cls, text: str) -> Condition:
        m = _CONDITION.match(text)
        if not m:
            raise ValueError(f"bad success condition {text!r}: use 'PATH == VALUE', e.g. 'success == true'")
        path, op, literal = m.groups()
        try:
            expected = json.loads(literal)
        except ValueError:
            expected = literal.strip("'\"")
        return cls(text, parse_path(path), op, expected)

    def check(self, data: Any) -> None:
        try:
            got = resolve(data, self.tokens, self.text)
        except ReplyError:
            got = None
        if (got == self.expected) != (self.op == "=="):
            raise ReplyError(UNSUCCESSFUL, f"success condition {self.text!r} not met (got {got!r})")


def _list_field(data: Any, key: str, n: int) -> list[Any]:
    if not isinstance(data, dict) or key not in data:
        raise ReplyError("wrong shape", f"expected an object with {key!r}, got {kind_of(data)}")
    values = data[key]
    if not isinstance(values, list):
        raise ReplyError("wrong shape", f"{key!r} should be a list, got {kind_of(values)}")
    if len(values) != n:
        raise ReplyError("wrong count", f"sent {n} items, {key!r} has {len(values)} values")
    return values


class AlignkitPreset(Preset):
    def __init__(self) -> None:
        super().__init__("alignkit")

    def build(self, items: list[Item]) -> dict[str, Any]:
        return {"items": [{"prompt": it[0], "response": it[1], "label": it[2]}
                          | ({"images": images_of(it)} if images_of(it) else {}) for it in items]}

    def parse(self, data: Any, n: int) -> tuple[list[Any], dict[str, list[Any]]]:
        return _list_field(data, "scores", n), {}


class LlamaFactoryPreset(Preset):
    """LLaMA-Factory's API reward (``get_rewards_from_server``): each sample's query + response
    token ids decoded with special tokens kept, i.e. the full templated text through the EOS."""

    full_text = True

    def __init__(self, model: str) -> None:
        super().__init__("llamafactory")
        self.model = model

    def build(self, items: list[Item]) -> dict[str, Any]:
        return {"model": self.model, "messages": [it[0] + it[1] for it in items]}

    def parse(self, data: Any, n: int) -> tuple[list[Any], dict[str, list[Any]]]:
        return _list_field(data, "scores", n), {}


class OpenRLHFPreset(Preset):
    """OpenRLHF's remote reward model (``--remote_rm_url``): ``query`` is the whole decoded
    sequence (templated prompt + response, special tokens kept), ``prompts`` the templated prompt."""

    full_text = True

    def __init__(self) -> None:
        super().__init__("openrlhf")

    def build(self, items: list[Item]) -> dict[str, Any]:
        return {
            "query": [it[0] + it[1] for it in items],
            "prompts": [it[0] for it in items],
            "labels": [it[2] for it in items],
        }

    def parse(self, data: Any, n: int) -> tuple[list[Any], dict[str, list[Any]]]:
        values = _list_field(data, "rewards", n)
        extra = data.get("extra_logs") or {}
        logs = {k: v for k, v in extra.items() if isinstance(v, list)} if isinstance(extra, dict) else {}
        return values, logs


class CustomPreset(Preset):
    """A JSON template with placeholders; one sample per request, or a batch list at ``batch_field``."""

    def __init__(
        self,
        payload: dict[str, Any],
        batch_field: str | None,
        response_path: str,
        success_condition: str | None,
    ) -> None:
        super().__init__("custom", max_batch=None if batch_field else 1)
        self.payload = payload
        self.batch_field = batch_field
        self.response_path = response_path
        self.tokens = parse_path(response_path)
        self.condition = Condition.parse(success_condition) if success_condition else None
        if self.batch_field:
            self.batch_tokens = parse_path(self.batch_field)
            try:
                self.item_template = resolve(self.payload, self.batch_tokens, self.batch_field)
            except ReplyError:
                raise ValueError(
                    f"reward_api.batch_field {self.batch_field!r} is not a key of reward_api.payload; "
                    "put the per-sample template there"
                ) from None

    def build(self, items: list[Item]) -> dict[str, Any]:
        if not self.batch_field:
            (item,) = items
            return render(self.payload, item)
        body = copy.deepcopy(self.payload)
        parent = resolve(body, self.batch_tokens[:-1], self.batch_field)
        parent[self.batch_tokens[-1]] = [render(self.item_template, it) for it in items]
        return body

    def parse(self, data: Any, n: int) -> tuple[list[Any], dict[str, list[Any]]]:
        if self.condition is not None:
            self.condition.check(data)
        values = resolve(data, self.tokens, self.response_path)
        if not self.batch_field:
            if isinstance(values, list):
                raise ReplyError(
                    "wrong count", f"sent 1 item, {self.response_path!r} is a list of {len(values)}"
                )
            return [values], {}
        if not isinstance(values, list):
            raise ReplyError("wrong shape", f"{self.response_path!r} should be a list, got {kind_of(values)}")
        if len(values) != n:
            raise ReplyError(
                "wrong count", f"sent {n} items, {self.response_path!r} has {len(values)} values"
            )
        return values, {}


def make_preset(cfg: Any) -> Preset:
    """The preset named by ``cfg.preset`` (its ``reward_api`` settings), configured from its keys."""
    if cfg.preset == "alignkit":
        return AlignkitPreset()
    if cfg.preset == "llamafactory":
        return LlamaFactoryPreset(cfg.model or "model")
    if cfg.preset == "openrlhf":
        return OpenRLHFPreset()
    if cfg.preset == "openai_judge":
        return OpenAIJudgePreset.from_config(cfg)
    if cfg.preset == "custom":
        return CustomPreset(cfg.payload or {}, cfg.batch_field, cfg.response_path, cfg.success_condition)
    raise ValueError(f"unknown reward_api.preset {cfg.preset!r}")


def shape_settings(cfg: Any) -> dict[str, Any]:
    """The preset keys that change what a score means (part of the cache key)."""
    if cfg.preset == "openai_judge":
        # Calibration keys count only when set (so caches written before they existed stay valid).
        calibration = {k: getattr(cfg, k) for k, default in CALIBRATION_DEFAULTS.items() if getattr(cfg, k) != default}
        if cfg.criteria:
            calibration["criteria"] = [c.model_dump() for c in cfg.criteria]
        if cfg.criteria_column:  # each row's rubric is in its cache key too (CacheScores)
            calibration["criteria_column"] = cfg.criteria_column
        if cfg.judge_mode != "pointwise":
            calibration[f"{cfg.judge_mode}_rubric"] = getattr(cfg, f"{cfg.judge_mode}_rubric")
        return {"rubric": cfg.rubric, "score_regex": cfg.score_regex} | calibration
    if cfg.preset == "custom":
        return {k: getattr(cfg, k) for k in ("payload", "batch_field", "response_path", "success_condition")}
    return {}

