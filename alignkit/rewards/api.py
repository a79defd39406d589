"""Score rollouts with a remote HTTP judge: concurrent, bounded, retried, validated, cached.

``reward_api.*`` keys live in ``RewardApiConfig``; request shapes in ``presets.py``. Every
value that comes back is validated; anything else (HTTP error, timeout, malformed JSON, a
wrong count, NaN, a string) is a failure with its reason, never a silent 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import re
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, field_serializer, model_validator

from alignkit.rewards.base import Score, ScoreMeta
from alignkit.rewards.cache import ScoreCache, cache_key, identity_of
from alignkit.rewards.headers import redact_headers, resolve_headers, scrub
from alignkit.rewards.presets import (
    DEFAULT_RUBRIC,
    Condition,
    Item,
    ReplyError,
    make_preset,
    parse_path,
    shape_settings,
)
from alignkit.rewards.text import DEFAULT_THINK_TAGS, ThinkFilter
from alignkit.rewards.transport import (
    Reply,
    RequestFailure,
    check_url,
    open_session,
    post,
    retry_after_seconds,
)

logger = logging.getLogger(__name__)

_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_HEALTH_ITEM: Item = ("What is 2 + 2?", "4", "4")


class RewardApiError(RuntimeError):
    """The judge cannot be used: bad config, failed start-up check, or too many failures."""


class RewardApiConfig(BaseModel):
    """``reward_api.*``: how to reach the judge and what to do when it misbehaves."""

    model_config = ConfigDict(extra="forbid")

    preset: Literal["alignkit", "llamafactory", "openrlhf", "openai_judge", "custom"] = Field(
        "alignkit", description="Request/reply shape of the judge (see docs/reward_api.md)."
    )
    url: str | None = Field(None, description="Full URL the scoring requests are POSTed to.")
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Extra HTTP headers; ${ENV_VAR} is replaced from the environment when the client starts.",
    )
    timeout_s: float = Field(30.0, gt=0, description="Total time allowed for one HTTP request, seconds.")
    max_retries: int = Field(
        3, ge=0, description="Retries after a retryable failure (so 1 + max_retries tries)."
    )
    backoff: float = Field(
        0.5, ge=0, description="Base retry delay, seconds; doubles per retry, with jitter."
    )
    backoff_max_s: float = Field(
        30.0, ge=0, description="Cap on one retry delay (Retry-After included), seconds."
    )
    max_concurrency: int = Field(32, ge=1, description="Requests in flight at once (connection pool size).")
    batch_size: int = Field(1, ge=1, description="Samples per request; 1 sends one request per sample.")
    rate_limit_rps: float | None = Field(
        None, gt=0, description="Most requests started per second; null: no limit."
    )
    on_failure: Literal["skip", "zero", "fail"] = Field(
        "skip",
        description="A failed score: skip (mask the sample out), zero (use 0.0), or fail (stop the run).",
    )
    max_failure_rate: float = Field(
        0.5, ge=0, le=1, description="Stop the run when a step's failed fraction exceeds this (0-1)."
    )
    cache: str | None = Field(None, description="SQLite file caching scores across runs; null: no cache.")
    strip_think: bool = Field(False, description="Remove the thought (between think_tags) before scoring.")
    think_tags: tuple[str, str] = Field(
        DEFAULT_THINK_TAGS, description="Opening and closing tag of a thought."
    )
    think_truncated: Literal["score", "fail"] = Field(
        "score",
        description="A response cut off inside its thought: give it think_truncated_score, or fail it.",
    )
    think_truncated_score: float = Field(0.0, description="Score of a response cut off inside its thought.")
    health_check: bool = Field(
        True, description="Send one probe request before training and stop on failure."
    )
    include_special_tokens: bool = Field(
        False,
        description="Keep special tokens (chat-template markers) in the decoded text sent to the judge.",
    )
    score_range: tuple[float, float] | None = Field(
        None,
        description="[low, high] a valid score must lie in; outside is a failure. null: any finite value.",
    )
    normalize: bool = Field(False, description="Map score_range linearly onto [0, 1].")
    max_body_bytes: int = Field(1_048_576, ge=1, description="Largest reply body accepted, bytes.")
    model: str | None = Field(
        None,
        description="Model name sent in the body (openai_judge: required; llamafactory: default 'model').",
    )
    rubric: str = Field(
        DEFAULT_RUBRIC, description="openai_judge prompt; {prompt}, {response}, {label} are filled in."
    )
    score_regex: str = Field(
        r"-?\d+(?:\.\d+)?",
        description="openai_judge: regex for the score in the reply (last match; group 1 if any).",
    )
    payload: dict[str, Any] | None = Field(
        None, description="custom: JSON body template; strings may hold {prompt}, {response}, {label}."
    )
    batch_field: str | None = Field(
        None,
        description="custom: key of payload holding the per-sample template; it becomes a list per batch.",
    )
    response_path: str = Field(
        "data",
        description="custom: where the score(s) are in the reply, e.g. data, data.score, results[*].score.",
    )
    success_condition: str | None = Field(
        None, description="custom: condition the reply must meet, e.g. 'success == true'."
    )

    @model_validator(mode="after")
    def _check(self) -> RewardApiConfig:
        if self.score_range is not None and not self.score_range[0] < self.score_range[1]:
            raise ValueError(
                f"reward_api.score_range must be [low, high] with low < high, got {self.score_range}"
            )
        if self.normalize and self.score_range is None:
            raise ValueError("reward_api.normalize needs reward_api.score_range, e.g. [0, 10]")
        try:
            re.compile(self.score_regex)
        except re.error as e:
            raise ValueError(f"reward_api.score_regex is not a valid regex: {e}") from None
        parse_path(self.response_path)
        if self.success_condition:
            Condition.parse(self.success_condition)
        if self.preset == "openai_judge" and not self.model:
            raise ValueError("reward_api.model is required for preset openai_judge (the judge model name)")
        if self.preset == "custom" and not self.payload:
            raise ValueError("reward_api.payload (a JSON template) is required for preset custom")
        single = self.preset == "openai_judge" or (self.preset == "custom" and not self.batch_field)
        if single and self.batch_size != 1:
            raise ValueError(
                f"reward_api.batch_size={self.batch_size} but preset {self.preset} sends one sample per "
                "request (custom: set batch_field to batch)"
            )
        return self

    @field_serializer("headers")
    def _serialize_headers(self, headers: dict[str, str]) -> dict[str, str]:
        # Saved configs and checkpoints go through model_dump: never write a literal secret.
        return redact_headers(headers)

    def redacted(self) -> dict[str, Any]:
        """The config as a plain dict with secret header values masked (for logs and saving)."""
        return self.model_dump()

    def __repr_args__(self):
        for name, value in super().__repr_args__():
            yield name, redact_headers(value) if name == "headers" else value


@dataclass
class _LoopState:
    """An aiohttp session and asyncio primitives belong to one event loop; rebuilt if the loop changes."""

    loop: asyncio.AbstractEventLoop
    session: aiohttp.ClientSession
    slots: asyncio.Semaphore


class ApiReward:
    """A ``RewardSource`` backed by an HTTP judge. Build it with ``build_api_reward(cfg)``."""

    def __init__(self, cfg: RewardApiConfig):
        if not cfg.url:
            raise RewardApiError(
                "reward_api.url is not set (or set the top-level reward_model to the judge URL)"
            )
        self.cfg = cfg
        self.url = cfg.url
        self.preset = make_preset(cfg)
        check_url(cfg.url)
        try:
            self._headers, self._secrets = resolve_headers(cfg.headers)
        except KeyError as e:
            raise RewardApiError(e.args[0]) from None
        self.think = (
            ThinkFilter(cfg.think_tags, cfg.think_truncated, cfg.think_truncated_score)
            if cfg.strip_think
            else None
        )
        self.identity = identity_of(
            {k: getattr(cfg, k) for k in ("preset", "url", "model", "score_range", "normalize")}
            | {"shape": shape_settings(cfg)}
        )
        self.cache = ScoreCache(cfg.cache) if cfg.cache else None
        self._state: _LoopState | None = None
        self._next_slot = 0.0
        self._lock = threading.Lock()  # metrics are read from the training thread
        self._counts: Counter[str] = Counter()
        self._latencies: list[float] = []
        self._extra: defaultdict[str, list[float]] = defaultdict(list)
        self._summary: Counter[str] = Counter()

    # -- RewardSource --------------------------------------------------------------------

    async def score(
        self, prompts: Sequence[str], responses: Sequence[str], meta: ScoreMeta | None = None
    ) -> list[Score]:
        n = len(prompts)
        labels = list(meta.labels) if meta and meta.labels is not None else [None] * n
        if len(responses) != n or len(labels) != n:
            raise ValueError(f"score(): {n} prompts, {len(responses)} responses, {len(labels)} labels")
        texts, results = self.think.apply(responses) if self.think else (list(responses), [None] * n)

        # Identical samples within the call are sent once; cached ones are not sent at all.
        groups: dict[str, list[int]] = {}
        for i in range(n):
            if results[i] is None:
                groups.setdefault(cache_key(self.identity, prompts[i], texts[i], labels[i]), []).append(i)
        hits = self.cache.get_many(list(groups)) if self.cache is not None else {}
        for key, value in hits.items():
            for i in groups[key]:
                results[i] = Score(value, cached=True)
        todo = [key for key in groups if key not in hits]
        bs = self.cfg.batch_size
        batches = [todo[j : j + bs] for j in range(0, len(todo), bs)]

        def item(key: str) -> Item:
            i = groups[key][0]
            return (prompts[i], texts[i], labels[i])

        outcomes = await asyncio.gather(*(self._score_batch([item(k) for k in b]) for b in batches))
        fresh: list[tuple[str, float]] = []
        for keys, scores in zip(batches, outcomes, strict=True):
            for key, s in zip(keys, scores, strict=True):
                for i in groups[key]:
                    results[i] = s
                if s.ok:
                    fresh.append((key, s.value))
        if self.cache is not None:
            self.cache.put_many(fresh)
        self._record(results, n_hits=sum(len(groups[k]) for k in hits))
        return results

    async def aclose(self) -> None:
        if self._state is not None and self._state.loop is asyncio.get_running_loop():
            await self._state.session.close()
        self._state = None
        if self.cache is not None:
            self.cache.close()
            self.cache = None

    def metrics(self) -> dict[str, float]:
        """``reward/failures``, ``reward/cache_hits``, latency percentiles (s), ``reward/extra/*`` means."""
        with self._lock:
            counts, self._counts = self._counts, Counter()
            latencies, self._latencies = self._latencies, []
            extra, self._extra = self._extra, defaultdict(list)
        out = {f"reward/{k}": float(counts[k]) for k in ("failures", "cache_hits", "requests", "retries")}
        if latencies:
            latencies.sort()
            out["reward/latency_p50"] = _percentile(latencies, 0.50)
            out["reward/latency_p95"] = _percentile(latencies, 0.95)
        for name, values in extra.items():
            out[f"reward/extra/{name}"] = sum(values) / len(values)
        return out

    def failure_summary(self) -> dict[str, int]:
        """Failures since the start of the run, counted per kind of reason (for the end-of-run report)."""
        with self._lock:
            return dict(self._summary)

    async def health_check(self) -> Score:
        """Send one probe request; raise ``RewardApiError`` showing request and reply if it fails."""
        body = json.dumps(self.preset.build([_HEALTH_ITEM])).encode()
        sent = f"POST {self.url}\n  headers: {redact_headers(self.cfg.headers)}\n  body: {_clip(body.decode(), 800)}"
        start = time.perf_counter()
        try:
            reply = await post(self._loop_state().session, self.url, body, self.cfg.max_body_bytes)
        except RequestFailure as f:
            raise self._health_error(f.reason, sent, "(no reply)") from None
        got = f"HTTP {reply.status}\n  body: {_clip(reply.content.decode(errors='replace'), 800)}"
        outcome = self._interpret(reply, 1)
        if isinstance(outcome, RequestFailure):
            problem = "auth failure" if reply.status in (401, 403) else outcome.reason
            raise self._health_error(problem, sent, got)
        score = outcome[0]
        if not score.ok:
            raise self._health_error(score.reason or "", sent, got)
        logger.info(
            "reward_api health check passed: %s answered %.3g in %.2f s",
            self.url,
            score.value,
            time.perf_counter() - start,
        )
        return score

    # -- one request ---------------------------------------------------------------------

    async def _score_batch(self, items: list[Item]) -> list[Score]:
        body = json.dumps(self.preset.build(items), ensure_ascii=False).encode()
        state = self._loop_state()
        start = time.perf_counter()
        failure = RequestFailure("not sent", "no attempt made")
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                await asyncio.sleep(self._retry_delay(attempt, failure.retry_after))
            async with state.slots:
                await self._wait_rate_slot()
                self._count("requests")
                try:
                    reply = await post(state.session, self.url, body, self.cfg.max_body_bytes)
                    outcome = self._interpret(reply, len(items))
                except RequestFailure as f:
                    outcome = f
            if not isinstance(outcome, RequestFailure):
                latency = time.perf_counter() - start
                with self._lock:
                    self._latencies.append(latency)
                return [
                    Score(s.value, s.reason and self._redact(s.reason), latency_s=latency) for s in outcome
                ]
            failure = outcome
            if not failure.retryable or attempt == self.cfg.max_retries:
                break
            self._count("retries")
            logger.debug("reward_api retry %d after %s", attempt + 1, self._redact(failure.reason))
        latency = time.perf_counter() - start
        return [Score.failure(self._redact(failure.reason), latency_s=latency)] * len(items)

    def _interpret(self, reply: Reply, n: int) -> list[Score] | RequestFailure:
        """Turn a reply into ``n`` scores (each validated), or a failure of the whole request."""
        if reply.status >= 300:
            text = _clip(reply.content.decode(errors="replace"), 200)
            retry_after = retry_after_seconds(reply.retry_after)
            kind = "auth failure" if reply.status in (401, 403) else f"HTTP {reply.status}"
            return RequestFailure(kind, text or "(empty body)", reply.status in _RETRY_STATUS, retry_after)
        try:
            data = json.loads(reply.content)
        except ValueError as e:
            # A proxy error page or a cut-off body is usually transient: retry it.
            return RequestFailure(
                "malformed JSON",
                f"{e}; body starts {_clip(reply.content.decode(errors='replace'), 120)!r}",
                True,
            )
        try:
            values, logs = self.preset.parse(data, n)
        except ReplyError as e:
            return RequestFailure(e.kind, e.detail)
        if logs:
            with self._lock:
                for name, vals in logs.items():
                    self._extra[name].extend(float(v) for v in vals if _is_number(v))
        return [self._validate(v) for v in values]

    def _validate(self, v: Any) -> Score:
        if not _is_number(v):
            return Score.failure(f"non-numeric score: {_clip(repr(v), 80)}")
        value = float(v)
        if not math.isfinite(value):
            return Score.failure(f"non-finite score: {value}")
        if self.cfg.score_range is not None:
            lo, hi = self.cfg.score_range
            if not lo <= value <= hi:
                return Score.failure(f"out of range: {value:g} not in [{lo:g}, {hi:g}]")
            if self.cfg.normalize:
                value = (value - lo) / (hi - lo)
        return Score(value)

    # -- plumbing ------------------------------------------------------------------------

    def _loop_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        if self._state is None or self._state.loop is not loop:
            c = self.cfg.max_concurrency
            session = open_session(c, self.cfg.timeout_s, self._headers)
            self._state = _LoopState(loop, session, asyncio.Semaphore(c))
        return self._state

    async def _wait_rate_slot(self) -> None:
        if self.cfg.rate_limit_rps is None:
            return
        now = time.monotonic()
        slot = max(now, self._next_slot)
        self._next_slot = slot + 1.0 / self.cfg.rate_limit_rps
        if slot > now:
            await asyncio.sleep(slot - now)

    def _retry_delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:  # the server said when; honour it (capped)
            return min(retry_after, self.cfg.backoff_max_s)
        # Exponential backoff with "equal jitter" (AWS Architecture Blog, 2015): spreads
        # retries of many concurrent requests so they do not hit the judge in lock-step.
        delay = min(self.cfg.backoff_max_s, self.cfg.backoff * 2 ** (attempt - 1))
        return delay * (0.5 + random.random() / 2)

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def _record(self, results: list[Score | None], n_hits: int) -> None:
        failed = [s.reason or "" for s in results if s is not None and not s.ok]
        with self._lock:
            self._counts["failures"] += len(failed)
            self._counts["cache_hits"] += n_hits
            for reason in failed:
                self._summary[reason.split(":", 1)[0]] += 1
        if failed:
            logger.warning(
                "reward_api: %d of %d scores failed; last: %s",
                len(failed),
                len(results),
                "; ".join(failed[-3:]),
            )

    def _redact(self, text: str) -> str:
        return scrub(text, self._secrets)

    def _health_error(self, problem: str, sent: str, got: str) -> RewardApiError:
        return RewardApiError(
            self._redact(
                f"reward_api start-up check failed: {problem}\n"
                f"request sent:\n  {sent}\nreply received:\n  {got}\n"
                "Check reward_api.url, reward_api.headers and reward_api.preset "
                "(or set reward_api.health_check: false to skip this check)."
            )
        )


def build_api_reward(cfg: RewardApiConfig) -> ApiReward:
    """The HTTP judge reward source for ``cfg`` (resolves ``${ENV}`` headers now)."""
    return ApiReward(cfg)


def apply_failure_policy(
    scores: Sequence[Score], on_failure: str = "skip", max_failure_rate: float = 1.0
) -> tuple[list[float], list[bool], int]:
    """``(values, valid_mask, n_failed)`` for a step's scores under ``reward_api.on_failure``.

    ``skip``: a failed sample has ``valid_mask`` False (its placeholder value 0.0 must not be
    used); ``zero``: it counts as 0.0; ``fail``: any failure raises. Raises ``RewardApiError``
    naming the last reasons when the failed fraction exceeds ``max_failure_rate``.
    """
    if on_failure not in ("skip", "zero", "fail"):
        raise ValueError(f"on_failure must be skip, zero or fail, got {on_failure!r}")
    reasons = [s.reason or "unknown" for s in scores if not s.ok]
    n_failed = len(reasons)
    last = "; ".join(list(dict.fromkeys(reversed(reasons)))[:3])  # newest distinct reasons
    if n_failed and on_failure == "fail":
        raise RewardApiError(
            f"{n_failed} of {len(scores)} scores failed and reward_api.on_failure is 'fail'; last reasons: {last}"
        )
    if scores and n_failed / len(scores) > max_failure_rate:
        raise RewardApiError(
            f"{n_failed} of {len(scores)} scores failed ({n_failed / len(scores):.0%}), above "
            f"reward_api.max_failure_rate={max_failure_rate:g}; last reasons: {last}"
        )
    values = [s.value if s.value is not None else 0.0 for s in scores]
    valid_mask = [s.ok or on_failure == "zero" for s in scores]
    return values, valid_mask, n_failed


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n] + f"... ({len(text)} chars)"
