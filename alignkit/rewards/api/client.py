"""Score rollouts with a remote HTTP judge: concurrent, bounded, retried, validated.

``reward_api.*`` keys live in ``config.py``; request shapes in ``presets.py``. Every
value that comes back is validated; anything else (HTTP error, timeout, malformed JSON, a
wrong count, NaN, a string) is a failure with its reason, never a silent 0. Think stripping,
the score cache and failure counts are wrappers every source gets (``rewards/wrappers.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import math
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from alignkit.rewards.api.config import ApiSettings
from alignkit.rewards.api.criteria import CRITERION_LOG
from alignkit.rewards.api.headers import redact_headers, resolve_headers, scrub
from alignkit.rewards.api.limits import TokenBudget, estimate_tokens
from alignkit.rewards.api.pairwise import ordered_pairs, pair_body, parse_pair, win_rates
from alignkit.rewards.api.presets import UNSUCCESSFUL, Item, ReplyError, make_preset, shape_settings
from alignkit.rewards.api.row_criteria import encode
from alignkit.rewards.api.transport import Reply, RequestFailure, open_session, post, retry_after_seconds
from alignkit.rewards.base import RewardError, Score, ScoreMeta, criteria_for, images_for, labels_for
from alignkit.rewards.cache import identity_of

logger = logging.getLogger(__name__)

_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
TOKENS = ("judge/prompt_tokens", "judge/completion_tokens")  # from each reply's OpenAI-style usage
_SUMMED_LOGS = {"judge/unparsed"}  # a preset's judge/* logs: these are counts, the rest gauges
PROBE_PROMPT, PROBE_ANSWER = "What is 2 + 2?", "4"  # the start-up probe's sample (and its label)


class RewardApiError(RewardError):
    """The judge cannot be used: no URL, a missing header variable, or a failed start-up check."""


@dataclass
class _LoopState:
    """An aiohttp session and asyncio primitives belong to one event loop; rebuilt if the loop changes."""

    loop: asyncio.AbstractEventLoop
    session: aiohttp.ClientSession
    slots: asyncio.Semaphore


class ApiReward:
    """A ``RewardSource`` backed by an HTTP judge. Build it with ``build_api_reward(cfg)``."""

    def __init__(self, cfg: ApiSettings):
        if not cfg.url:
            raise RewardApiError(
                "reward_api.url is not set (or set the top-level reward_model to the judge URL)"
            )
        self.cfg = cfg
        self.url = cfg.url
        self.preset = make_preset(cfg)
        try:
            self._headers, self._secrets = resolve_headers(cfg.headers)
        except KeyError as e:
            raise RewardApiError(e.args[0]) from None
        # What a score means (the score cache's key): presets without a model name count as None.
        self.identity = identity_of(
            {k: getattr(cfg, k, None) for k in ("preset", "url", "model", "score_range", "normalize")}
            | {"shape": shape_settings(cfg)}
        )
        self._state: _LoopState | None = None
        self._next_slot = 0.0
        self._lock = threading.Lock()  # metrics are read from the training thread
        self._counts: Counter[str] = Counter()
        self._latencies: list[float] = []
        self._extra: defaultdict[str, list[float]] = defaultdict(list)
        self._budget = TokenBudget(cfg.max_tokens_per_minute) if cfg.max_tokens_per_minute else None
        self._saw_usage = False  # token metrics are logged once a reply has carried usage
        self.mode = getattr(cfg, "judge_mode", "pointwise")
        self.listwise = self.mode == "listwise"

    # -- RewardSource --------------------------------------------------------------------

    async def score(
        self, prompts: Sequence[str], responses: Sequence[str], meta: ScoreMeta | None = None
    ) -> list[Score]:
        prompts, responses = self._texts(prompts, responses, meta)
        n = len(responses)
        samples = list(zip(prompts, responses, labels_for(meta, n), images_for(meta, n), criteria_for(meta, n),
                           strict=True))
        # Identical samples within the call are sent once.
        items, bs = list(dict.fromkeys(samples)), self.cfg.batch_size
        if self.mode != "pointwise":  # a group: the responses to one (prompt, label, images)
            groups: dict[tuple, list[Item]] = {}
            for item in items:
                groups.setdefault((item[0], item[2], item[3]), []).append(item)
            batches = list(groups.values())
        else:
            batches = [items[j : j + bs] for j in range(0, len(items), bs)]
        outcomes = await asyncio.gather(*(self._score_batch(b) for b in batches))
        scored: dict[Item, Score] = {}
        for batch, scores in zip(batches, outcomes, strict=True):
            scored.update(zip(batch, scores, strict=True))
        return [scored[item] for item in samples]

    def _texts(
        self, prompts: Sequence[str], responses: Sequence[str], meta: ScoreMeta | None
    ) -> tuple[Sequence[str], Sequence[str]]:
        """What the preset sends: the templated prompt and the response with its special tokens for
        presets that imitate a trainer (llamafactory, openrlhf) when the trainer passed them."""
        if self.preset.full_text and meta is not None and meta.templated_prompts is not None:
            return meta.templated_prompts, meta.full_responses if meta.full_responses is not None else responses
        return prompts, responses

    async def aclose(self) -> None:
        if self._state is not None and self._state.loop is asyncio.get_running_loop():
            await self._state.session.close()
        self._state = None

    def metrics(self) -> dict[str, float]:
        """``reward/requests``, ``reward/retries``, latency percentiles (s), ``reward/extra/*`` means."""
        with self._lock:
            counts, self._counts = self._counts, Counter()
            latencies, self._latencies = self._latencies, []
            extra, self._extra = self._extra, defaultdict(list)
        out = {f"reward/{k}": float(counts[k]) for k in ("requests", "retries")}
        out |= self._judge_metrics(counts)
        if latencies:
            latencies.sort()
            out["reward/latency_p50"] = _percentile(latencies, 0.50)
            out["reward/latency_p95"] = _percentile(latencies, 0.95)
        for name, values in extra.items():
            out[name if name.startswith("judge/") else f"reward/extra/{name}"] = sum(values) / len(values)
        return out

    def _judge_metrics(self, counts: Counter[str]) -> dict[str, float]:
        """Tokens from the replies' ``usage`` and their cost (``price_per_million``), unusable judge samples."""
        out = {k: float(counts[k]) for k in _SUMMED_LOGS if k in counts}
        if not self._saw_usage:
            return out
        out |= {k: float(counts[k]) for k in TOKENS}
        price = self.cfg.price_per_million
        if price is not None:
            p_in, p_out = (price, price) if isinstance(price, (int, float)) else price
            out["judge/cost_usd"] = (counts[TOKENS[0]] * p_in + counts[TOKENS[1]] * p_out) / 1e6
        return out

    async def health_check(self, meta: ScoreMeta | None = None) -> Score:
        """Send one probe request, retried like any scoring request; raise ``RewardApiError``
        showing request and reply if it still fails. Its counters are not step 1's metrics.
        ``meta`` carries the probe's templated texts for a full-text preset."""
        prompts, responses = self._texts([PROBE_PROMPT], [PROBE_ANSWER], meta)
        body = json.dumps(self.preset.build([(prompts[0], responses[0], PROBE_ANSWER, ())])).encode()
        sent = f"POST {self.url}\n  headers: {redact_headers(self.cfg.headers)}\n  body: {_clip(body.decode(), 800)}"
        outcome, reply, latency = await self._send(body, 1, probe=True)
        with self._lock:  # the probe's tokens were paid for: they stay, counted in step 1
            tokens = {k: self._counts[k] for k in TOKENS}
        self.metrics()  # drop the probe's requests, latency and extra_logs
        with self._lock:
            self._counts.update(tokens)
        got = "(no reply)" if reply is None else (
            f"HTTP {reply.status}\n  body: {_clip(reply.content.decode(errors='replace'), 800)}")
        if isinstance(outcome, RequestFailure):
            raise self._health_error(outcome.reason, sent, got)
        score = outcome[0]
        if not score.ok:
            raise self._health_error(score.reason or "", sent, got)
        logger.info("reward_api health check passed: %s answered %.3g in %.2f s", self.url, score.value, latency)
        return score

    # -- one request ---------------------------------------------------------------------

    async def _score_batch(self, items: list[Item]) -> list[Score]:
        if self.mode == "pairwise" and len(items) > 1:
            return await self._score_pairs(items)
        if getattr(self.preset, "per_criterion", False):
            return [await self._score_per_criterion(item) for item in items]
        if not self.listwise:
            return await self._score_request(items)
        # Shown in an order of their own, so a judge's position bias does not follow the sampler's
        # order; seeded by the group, so the same group is shown the same way (retries, replays).
        order = list(range(len(items)))
        random.Random(hashlib.sha256(repr(items).encode()).digest()).shuffle(order)
        shown = await self._score_request([items[i] for i in order])
        scores: list[Score] = [shown[0]] * len(items)
        for j, i in enumerate(order):
            scores[i] = shown[j]
        return scores

    async def _score_pairs(self, items: list[Item]) -> list[Score]:
        """``judge_mode: pairwise`` (api/pairwise.py): every ordered pair, a win rate per response."""
        pairs = ordered_pairs(len(items))
        outcomes = await asyncio.gather(*(self._compare(items[i], items[j]) for i, j in pairs))
        rates = win_rates(len(items), [(i, j, o.value) for (i, j), o in zip(pairs, outcomes, strict=True)])
        failed = next((o.reason for o in outcomes if not o.ok), None)
        latency = max(o.latency_s or 0.0 for o in outcomes)
        return [Score(r, latency_s=latency) if r is not None
                else Score.failure(f"{failed} (every comparison of this response failed)", latency_s=latency)
                for r in rates]

    async def _score_per_criterion(self, item: Item) -> Score:
        """``criteria_mode: per_criterion``: one request per criterion of the item's rubric, each the
        criteria rubric with that criterion alone; the score is their weighted mean. Any failed
        criterion fails the sample (a mean over the criteria that came back would be another rubric)."""
        criteria = self.preset.criteria_of(item)
        alone = [(*item[:4], encode([c])) for c in criteria]
        outcomes = await asyncio.gather(*(self._score_request([one]) for one in alone))
        latency = max((o[0].latency_s or 0.0 for o in outcomes), default=0.0)
        for c, (o,) in zip(criteria, outcomes, strict=True):
            if not o.ok:
                return Score.failure(f"criterion {c.name!r}: {o.reason}", latency_s=latency)
        total = sum(c.weight for c in criteria)
        value = sum(c.weight * o[0].value for c, o in zip(criteria, outcomes, strict=True)) / total
        details = {k: v for (o,) in outcomes for k, v in (o.details or {}).items()}
        return Score(value, latency_s=latency, details=details)

    async def _compare(self, a: Item, b: Item) -> Score:
        cfg = self.cfg
        body = json.dumps(pair_body(cfg.model, cfg.pairwise_rubric, a, b, cfg.temperature), ensure_ascii=False)
        outcome, _, latency = await self._send(body.encode(), 1, pair=True)
        if isinstance(outcome, RequestFailure):
            return Score.failure(self._redact(outcome.reason), latency_s=latency)
        with self._lock:
            self._latencies.append(latency)
        return Score(outcome[0].value, latency_s=latency)

    async def _score_request(self, items: list[Item]) -> list[Score]:
        body = json.dumps(self.preset.build(items), ensure_ascii=False).encode()
        outcome, _, latency = await self._send(body, len(items), items=items)
        if isinstance(outcome, RequestFailure):
            return [Score.failure(self._redact(outcome.reason), latency_s=latency)] * len(items)
        with self._lock:
            self._latencies.append(latency)
        return [Score(s.value, s.reason and self._redact(s.reason), latency_s=latency, details=s.details)
                for s in outcome]

    async def _send(
        self, body: bytes, n: int, probe: bool = False, pair: bool = False, items: list[Item] | None = None
    ) -> tuple[list[Score] | RequestFailure, Reply | None, float]:
        """POST ``body`` (``n`` items) with the retry policy: the last attempt's outcome, its reply
        (``None`` when none came) and the time taken over all attempts, seconds. The start-up
        ``probe`` also retries a reply that says it failed (``{"success": false}``): a judge that
        fails once at start is busy, not dead, as with a 5xx."""
        state = self._loop_state()
        start = time.perf_counter()
        failure, reply = RequestFailure("not sent", "no attempt made"), None
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                await asyncio.sleep(self._retry_delay(attempt, failure.retry_after))
            async with state.slots:
                await self._wait_rate_slot()
                entry = await self._budget.acquire(estimate_tokens(body)) if self._budget else None
                self._count("requests")
                try:
                    reply = await post(state.session, self.url, body, self.cfg.max_body_bytes)
                    outcome = self._interpret(reply, n, entry, pair, items)
                except RequestFailure as f:
                    reply, outcome = None, f
            if not isinstance(outcome, RequestFailure):
                return outcome, reply, time.perf_counter() - start
            failure = outcome
            retryable = failure.retryable or (probe and failure.kind == UNSUCCESSFUL)
            if not retryable or attempt == self.cfg.max_retries:
                break
            self._count("retries")
            logger.debug("reward_api retry %d after %s", attempt + 1, self._redact(failure.reason))
        return failure, reply, time.perf_counter() - start

    def _interpret(self, reply: Reply, n: int, entry: list[float] | None = None,
                   pair: bool = False, items: list[Item] | None = None) -> list[Score] | RequestFailure:
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
        self._record_usage(data, entry)
        try:
            if pair:  # a comparison: what it gave the first response, 0..1, not a score on score_range
                return [Score(parse_pair(data))]
            values, logs = self.preset.parse_items(data, items) if items else self.preset.parse(data, n)
        except ReplyError as e:
            return RequestFailure(e.kind, e.detail)
        scores = [self._validate(v) for v in values]
        if logs:
            with self._lock:
                for name, vals in logs.items():
                    if name in _SUMMED_LOGS:
                        self._counts[name] += int(sum(v for v in vals if _is_number(v)))
                    else:
                        self._extra[name].extend(float(v) for v in vals if _is_number(v))
        # One sample's rubric scores stay with its score (samples.jsonl, the report's sample tables).
        details = {k.removeprefix(CRITERION_LOG): float(v[0]) for k, v in logs.items()
                   if k.startswith(CRITERION_LOG) and len(v) == 1 and _is_number(v[0])}
        if n == 1 and details and scores[0].ok:
            scores = [dataclasses.replace(scores[0], details=details)]
        return scores

    def _record_usage(self, data: Any, entry: list[float] | None) -> None:
        """Count an OpenAI-style ``usage`` (a reply that fails to parse was still paid for)."""
        usage = data.get("usage") if isinstance(data, dict) else None
        if not isinstance(usage, dict):
            return
        pt, ct = (usage.get(k) for k in ("prompt_tokens", "completion_tokens"))
        pt, ct = (int(x) if _is_number(x) else 0 for x in (pt, ct))
        with self._lock:
            self._saw_usage = True
            self._counts[TOKENS[0]] += pt
            self._counts[TOKENS[1]] += ct
        if entry is not None:
            TokenBudget.settle(entry, pt + ct)

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


def build_api_reward(cfg: ApiSettings) -> ApiReward:
    """The HTTP judge reward source for ``cfg`` (resolves ``${ENV}`` headers now)."""
    return ApiReward(cfg)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n] + f"... ({len(text)} chars)"
