"""What every reward source gets, whichever it is: think stripping, a score cache, failure counts.

Each wrapper is itself a ``RewardSource`` around another one, so rules, trained reward models
and the HTTP judge are treated the same way. ``build_reward_source`` stacks them as
``CountFailures(StripThink(CacheScores(source)))``: the cache sees the answer without its
thought (the text actually scored), and failures settled by the think filter are counted.
Counters are read from the training thread while scoring runs on the scorer's thread, hence
the locks.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence

from alignkit.rewards.base import RewardSource, Score, ScoreMeta, criteria_for, images_for, labels_for
from alignkit.rewards.cache import ScoreCache, cache_key
from alignkit.rewards.text import ThinkFilter

logger = logging.getLogger(__name__)


async def score_some(
    source: RewardSource,
    prompts: Sequence[str],
    responses: Sequence[str],
    meta: ScoreMeta | None,
    todo: list[int],
    results: list[Score | None],
) -> list[Score | None]:
    """Score only the samples at ``todo`` with ``source`` and put each score in its place."""
    if todo:
        sub_meta = meta.select(todo) if meta is not None else None
        scores = await source.score([prompts[i] for i in todo], [responses[i] for i in todo], sub_meta)
        for i, s in zip(todo, scores, strict=True):
            results[i] = s
    return results


class SourceWrapper:
    """A ``RewardSource`` around ``inner``; passes on whatever a subclass does not change."""

    def __init__(self, inner: RewardSource) -> None:
        self.inner = inner

    async def score(
        self, prompts: Sequence[str], responses: Sequence[str], meta: ScoreMeta | None = None
    ) -> list[Score]:
        return await self.inner.score(prompts, responses, meta)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def metrics(self) -> dict[str, float]:
        return self.inner.metrics()


class StripThink(SourceWrapper):
    """Score the answer, not the thought (``strip_think``).

    A response cut off inside its thought has no answer: it is settled here by the filter
    (``think_truncated``) and never reaches the source. Reports
    ``rollout/think_truncated_frac`` over the responses seen since the last read.
    """

    def __init__(self, inner: RewardSource, think: ThinkFilter) -> None:
        super().__init__(inner)
        self.think = think
        self._lock = threading.Lock()
        self._seen = 0
        self._truncated = 0

    async def score(
        self, prompts: Sequence[str], responses: Sequence[str], meta: ScoreMeta | None = None
    ) -> list[Score]:
        texts, results = self.think.apply(responses)
        if meta is not None and meta.full_responses is not None:  # what full-text presets send: stripped too
            meta = dataclasses.replace(meta, full_responses=self.think.apply(meta.full_responses)[0])
        todo = [i for i, settled in enumerate(results) if settled is None]
        with self._lock:
            self._seen += len(responses)
            self._truncated += len(responses) - len(todo)
        return await score_some(self.inner, prompts, texts, meta, todo, results)

    def metrics(self) -> dict[str, float]:
        out = self.inner.metrics()
        with self._lock:
            seen, truncated = self._seen, self._truncated
            self._seen = self._truncated = 0
        if seen:
            out["rollout/think_truncated_frac"] = truncated / seen
        return out


class CacheScores(SourceWrapper):
    """Successful scores kept in a ``ScoreCache`` file (``reward_cache``) across steps and runs.

    ``identity`` names what a score means (judge URL and settings, rule name, reward model
    path), so a changed source never reuses old scores. Reports ``reward/cache_hits``.
    """

    def __init__(self, inner: RewardSource, cache: ScoreCache, identity: str) -> None:
        super().__init__(inner)
        self.cache = cache
        self.identity = identity
        self._lock = threading.Lock()
        self._hits = 0

    async def score(
        self, prompts: Sequence[str], responses: Sequence[str], meta: ScoreMeta | None = None
    ) -> list[Score]:
        labels = labels_for(meta, len(responses))
        # The templated prompt, where the trainer gives it: a changed system prompt is another sample.
        shown = meta.templated_prompts if meta is not None and meta.templated_prompts is not None else prompts
        # A prompt's images are part of what was asked: the same text with another image is another sample.
        shown = [p + "".join(f"\x00{i}" for i in imgs) for p, imgs in zip(shown, images_for(meta, len(responses)),
                                                                           strict=True)]
        # A row's own rubric (criteria_column) is part of what the score means.
        shown = [p if c is None else f"{p}\x00criteria:{c}" for p, c in zip(shown, criteria_for(meta, len(responses)),
                                                                             strict=True)]
        keys = [cache_key(self.identity, p, r, lb) for p, r, lb in zip(shown, responses, labels, strict=True)]
        hits = self.cache.get_many(list(dict.fromkeys(keys)))
        results: list[Score | None] = [Score(hits[k], cached=True) if k in hits else None for k in keys]
        todo = [i for i, k in enumerate(keys) if k not in hits]
        await score_some(self.inner, prompts, responses, meta, todo, results)
        # Failures are not stored: the next step (or run) asks again.
        self.cache.put_many((keys[i], results[i].value) for i in todo if results[i].ok)
        with self._lock:
            self._hits += len(keys) - len(todo)
        return results

    async def aclose(self) -> None:
        try:
            await self.inner.aclose()
        finally:
            self.cache.close()

    def metrics(self) -> dict[str, float]:
        with self._lock:
            hits, self._hits = self._hits, 0
        return {**self.inner.metrics(), "reward/cache_hits": float(hits)}


class CountFailures(SourceWrapper):
    """``reward/failures`` since the last read, failures per kind of reason over the whole run,
    and a warning naming the reasons whenever a call has failures."""

    # Responses are scored one by one as they finish, so a flaky judge would log a line per failed
    # response: after the first, failures are summed into one line at most every WARN_EVERY_S seconds.
    WARN_EVERY_S = 30.0

    def __init__(self, inner: RewardSource) -> None:
        super().__init__(inner)
        self._lock = threading.Lock()
        self._failures = 0
        self._summary: Counter[str] = Counter()
        self._unwarned = [0, 0]  # failed, scored since the last warning
        self._warned_at: float | None = None

    async def score(
        self, prompts: Sequence[str], responses: Sequence[str], meta: ScoreMeta | None = None
    ) -> list[Score]:
        scores = await self.inner.score(prompts, responses, meta)
        failed = [s.reason or "unknown" for s in scores if not s.ok]
        with self._lock:
            self._failures += len(failed)
            # A reason starts with its kind ("HTTP 500: ...", "rule error: ..."); see docs/reward_api.md.
            self._summary.update(reason.split(":", 1)[0] for reason in failed)
            self._unwarned[0] += len(failed)
            self._unwarned[1] += len(scores)
            now, n_failed, n = time.monotonic(), *self._unwarned
            due = failed and (self._warned_at is None or now - self._warned_at >= self.WARN_EVERY_S)
            if due:
                self._warned_at, self._unwarned = now, [0, 0]
        if due:
            logger.warning("reward: %d of %d scores failed; last: %s", n_failed, n, "; ".join(failed[-3:]))
        return scores

    def metrics(self) -> dict[str, float]:
        with self._lock:
            failures, self._failures = self._failures, 0
        return {**self.inner.metrics(), "reward/failures": float(failures)}

    def failure_summary(self) -> dict[str, int]:
        """Failures since the source was built, counted per kind of reason (end-of-run report)."""
        with self._lock:
            return dict(self._summary)
