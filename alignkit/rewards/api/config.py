"""``reward_api``: how to reach an HTTP judge; one pydantic model per request shape (``preset``).

Validated when the config loads, so a misspelled key, a bad URL or an unusable template fails
before any model is loaded. Keys that apply to every reward source (``on_failure``,
``strip_think``, ``cache`` ...) are ``RewardSpec``'s; their old spellings under
``reward_api`` (``LIFTED``) are still read and moved there.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    field_serializer,
    field_validator,
    model_validator,
)

from alignkit.rewards.api.criteria import CRITERIA_RUBRIC, Criterion
from alignkit.rewards.api.headers import redact_headers
from alignkit.rewards.api.openai_judge import LISTWISE_RUBRIC
from alignkit.rewards.api.pairwise import PAIRWISE_RUBRIC
from alignkit.rewards.api.presets import DEFAULT_RUBRIC, DEFAULT_SCORE_REGEX, make_preset
from alignkit.rewards.api.transport import check_url

PRESETS = ("alignkit", "llamafactory", "openrlhf", "openai_judge", "custom")

# reward_api.<old key> -> the RewardSpec key it now sets (same meaning for every source).
_SAME_NAME = ("on_failure", "max_failure_rate", "strip_think", "think_tags", "think_truncated",
              "think_truncated_score", "include_special_tokens")
LIFTED = {key: key for key in _SAME_NAME} | {"cache": "reward_cache"}


class ApiSettings(BaseModel):
    """Keys every preset shares: where the judge is, how to talk to it, what a valid score is."""

    model_config = ConfigDict(extra="forbid")
    # Accepted under reward_api although not fields here: "did you mean" suggests them too.
    ALSO_ACCEPTED: ClassVar[frozenset[str]] = frozenset(LIFTED)

    preset: str
    url: str | None = Field(
        None, description="Full URL the scoring requests are POSTed to (default: the top-level reward_model)."
    )
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Extra HTTP headers; ${ENV_VAR} is replaced from the environment when the client starts.",
    )
    timeout_s: float = Field(30.0, gt=0, description="Total time allowed for one HTTP request, seconds.")
    max_retries: int = Field(3, ge=0, description="Retries after a retryable failure (so 1 + max_retries tries).")
    backoff: float = Field(0.5, ge=0, description="Base retry delay, seconds; doubles per retry, with jitter.")
    backoff_max_s: float = Field(30.0, ge=0, description="Cap on one retry delay (Retry-After included), seconds.")
    max_concurrency: int = Field(32, ge=1, description="Requests in flight at once (connection pool size).")
    batch_size: int = Field(1, ge=1, description="Samples per request; 1 sends one request per sample.")
    rate_limit_rps: float | None = Field(None, gt=0, description="Most requests started per second; null: no limit.")
    health_check: bool = Field(True, description="Send one probe request before training and stop on failure.")
    score_range: tuple[float, float] | None = Field(
        None, description="[low, high] a valid score must lie in; outside is a failure. null: any finite value."
    )
    normalize: bool = Field(False, description="Map score_range linearly onto [0, 1].")
    max_body_bytes: int = Field(1_048_576, ge=1, description="Largest reply body accepted, bytes.")
    max_tokens_per_minute: int | None = Field(
        None, gt=0, description="Most judge tokens (prompt + completion, from each reply's usage) per rolling minute; "
        "requests wait for room. null: no limit."
    )
    price_per_million: float | tuple[float, float] | None = Field(
        None, description="USD per million judge tokens: one price, or [prompt, completion]; logs judge/cost_usd."
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None:
            check_url(url)
        return url

    @model_validator(mode="after")
    def _check(self) -> ApiSettings:
        if self.score_range is not None and not self.score_range[0] < self.score_range[1]:
            raise ValueError(f"reward_api.score_range must be [low, high] with low < high, got {self.score_range}")
        if self.normalize and self.score_range is None:
            raise ValueError("reward_api.normalize needs reward_api.score_range, e.g. [0, 10]")
        return self

    def _one_per_request(self, why: str) -> None:
        if self.batch_size != 1:
            raise ValueError(
                f"reward_api.batch_size={self.batch_size} but preset {self.preset} sends one sample per request{why}"
            )

    @field_serializer("headers")
    def _serialize_headers(self, headers: dict[str, str]) -> dict[str, str]:
        # Saved configs and checkpoints go through model_dump: never write a literal secret.
        return redact_headers(headers)

    def redacted(self) -> dict[str, Any]:
        """The settings as a plain dict with secret header values masked (for logs and saving)."""
        return self.model_dump()

    def __repr_args__(self):
        for name, value in super().__repr_args__():
            yield name, redact_headers(value) if name == "headers" else value


class AlignkitApi(ApiSettings):
    """``{"items": [{prompt, response, label}]}`` -> ``{"scores": [...]}`` (the default)."""

    preset: Literal["alignkit"] = Field("alignkit", description="Request/reply shape of the judge.")


class LlamaFactoryApi(ApiSettings):
    """LLaMA-Factory's API reward: ``{"model", "messages": [prompt+response, ...]}`` -> ``{"scores"}``."""

    preset: Literal["llamafactory"] = Field(description="Request/reply shape of the judge.")
    model: str = Field("model", description="Model name sent in the body.")


class OpenRLHFApi(ApiSettings):
    """OpenRLHF's remote reward model: ``{"query", "prompts", "labels"}`` -> ``{"rewards", "extra_logs"}``."""

    preset: Literal["openrlhf"] = Field(description="Request/reply shape of the judge.")


class OpenAIJudgeApi(ApiSettings):
    """An LLM judge behind an OpenAI-compatible chat completions endpoint, one sample per request."""

    preset: Literal["openai_judge"] = Field(description="Request/reply shape of the judge.")
    model: str = Field(description="The judge model's name, sent in the body.")
    rubric: str = Field(DEFAULT_RUBRIC, description="The judge prompt; {prompt}, {response}, {label} are filled in.")
    score_regex: str = Field(
        DEFAULT_SCORE_REGEX, description="Regex for the score in the reply (last match; group 1 if any); "
        "a match written as a fraction (3/10) scores its numerator."
    )

    score_format: Literal["text", "json"] = Field(
        "text", description="text: the score is read from the reply with score_regex; json: ask for {\"score\": N} "
        "through response_format (a JSON schema; OpenAI, vLLM and SGLang constrain the reply to it)."
    )
    score_from: Literal["text", "logprobs"] = Field(
        "text", description="logprobs: the expected score over score_range from the score token's top_logprobs "
        "(G-Eval); needs a server that returns logprobs."
    )
    judge_samples: int = Field(1, ge=1, le=64, description="Judgements per sample (the request's n); needs temperature > 0.")
    judge_aggregate: Literal["mean", "median"] = Field("mean", description="How judge_samples scores become one.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Sampling temperature of the judge.")
    judge_mode: Literal["pointwise", "listwise", "pairwise"] = Field(
        "pointwise", description="listwise: one request per group (same prompt), responses shuffled under anonymous "
        "ids, JSON scores per id; an unusable reply fails the group's items. pairwise: every pair of a group "
        "compared in both orders; the score is the win rate in [0, 1]."
    )
    criteria: list[Criterion] | None = Field(
        None, description="A rubric of weighted criteria [{name, weight, description}] scored in one call as JSON; "
        "the score is their weighted mean; rubric then defaults to one with a {criteria} list."
    )
    criteria_column: str | None = Field(
        None, description="Dataset column holding each row's own criteria (same shape as criteria, or that list as "
        "JSON text), merged with criteria by name: a row's criterion replaces the global one of its name, new "
        "names are added. Checked row by row before training."
    )
    criteria_mode: Literal["holistic", "per_criterion"] = Field(
        "holistic", description="holistic: every criterion scored in one JSON reply; per_criterion: one request per "
        "criterion (N times the calls and prompt tokens), combined with the weights; a failed criterion fails the "
        "sample."
    )
    pairwise_rubric: str = Field(
        PAIRWISE_RUBRIC, description="judge_mode: pairwise prompt; {prompt}, {label}, {response_a}, {response_b}."
    )
    listwise_rubric: str = Field(
        LISTWISE_RUBRIC, description="judge_mode: listwise prompt; {prompt}, {label} and {responses} are filled in."
    )

    @model_validator(mode="after")
    def _check_judge(self) -> OpenAIJudgeApi:
        try:
            re.compile(self.score_regex)
        except re.error as e:
            raise ValueError(f"reward_api.score_regex is not a valid regex: {e}") from None
        if self.score_from == "logprobs" and self.score_range is None:
            raise ValueError("reward_api.score_from: logprobs needs reward_api.score_range (e.g. [0, 10]): the "
                             "expected score is taken over the score tokens on that scale")
        if self.judge_mode != "pointwise" and (self.judge_samples > 1 or self.score_from != "text"):
            raise ValueError(f"reward_api.judge_mode: {self.judge_mode} reads one JSON verdict per request; it does "
                             "not combine with judge_samples > 1 or score_from: logprobs")
        if self.judge_mode == "listwise" and "{responses}" not in self.listwise_rubric:
            raise ValueError("reward_api.listwise_rubric must contain {responses} (where the numbered responses go)")
        if self.criteria or self.criteria_column:
            self._check_criteria()
        elif self.criteria_mode != "holistic":
            raise ValueError(f"reward_api.criteria_mode: {self.criteria_mode} needs reward_api.criteria or "
                             "reward_api.criteria_column (the criteria to score one per request)")
        if self.judge_samples > 1 and self.temperature == 0:
            raise ValueError(f"reward_api.judge_samples={self.judge_samples} with temperature 0 asks for the same "
                             "judgement several times; set reward_api.temperature (e.g. 0.7) or judge_samples: 1")
        self._one_per_request("")
        return self

    def _check_criteria(self) -> None:
        names = [c.name for c in self.criteria or []]
        if len(set(names)) != len(names):
            raise ValueError(f"reward_api.criteria: names must be unique, got {names}")
        if self.judge_mode != "pointwise" or self.judge_samples > 1 or self.score_from != "text":
            raise ValueError("reward_api.criteria (and criteria_column) are scored as JSON replies per sample; they do "
                             "not combine with judge_mode listwise/pairwise, judge_samples > 1 or score_from: logprobs")
        if "rubric" not in self.model_fields_set:
            self.rubric = CRITERIA_RUBRIC
        elif "{criteria}" not in self.rubric:
            raise ValueError("reward_api.rubric must contain {criteria} (where the criteria are listed) when "
                             "reward_api.criteria is set")


class CustomApi(ApiSettings):
    """Any JSON API, described by a body template and where the score is in the reply."""

    preset: Literal["custom"] = Field(description="Request/reply shape of the judge.")
    payload: dict[str, Any] = Field(
        min_length=1, description="JSON body template; strings may hold {prompt}, {response}, {label}."
    )
    batch_field: str | None = Field(
        None, description="Key of payload holding the per-sample template; it becomes a list per batch."
    )
    response_path: str = Field(
        "data", description="Where the score(s) are in the reply, e.g. data, data.score, results[*].score."
    )
    success_condition: str | None = Field(
        None, description="Condition the reply must meet, e.g. 'success == true'."
    )

    @model_validator(mode="after")
    def _check_template(self) -> CustomApi:
        make_preset(self)  # parses response_path, success_condition and finds batch_field in payload
        if not self.batch_field:
            self._one_per_request(" (set batch_field to batch)")
        return self


def _preset_of(value: Any) -> str:
    """The preset a reward_api mapping (or model) names; ``alignkit`` when it names none."""
    if isinstance(value, dict):
        return value.get("preset", "alignkit")
    return getattr(value, "preset", "alignkit")


RewardApiConfig = Annotated[
    Annotated[AlignkitApi, Tag("alignkit")]
    | Annotated[LlamaFactoryApi, Tag("llamafactory")]
    | Annotated[OpenRLHFApi, Tag("openrlhf")]
    | Annotated[OpenAIJudgeApi, Tag("openai_judge")]
    | Annotated[CustomApi, Tag("custom")],
    Discriminator(
        _preset_of,
        custom_error_type="unknown_preset",
        custom_error_message=f"reward_api.preset must be one of {', '.join(PRESETS)}",
    ),
]
"""The ``reward_api`` block: the model of the preset it names."""

_ADAPTER: TypeAdapter[ApiSettings] = TypeAdapter(RewardApiConfig)


def parse_reward_api(keys: dict[str, Any]) -> ApiSettings:
    """Validate a ``reward_api`` mapping into its preset's settings (``ValidationError`` if wrong)."""
    return _ADAPTER.validate_python(keys)
