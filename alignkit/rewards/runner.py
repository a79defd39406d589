"""Run a reward source on its own event-loop thread so scoring overlaps rollout and forward passes.

The training loop submits each chunk of finished rollouts and keeps computing on the main
thread; HTTP requests proceed meanwhile. Waiting on the futures later is ``time/score_wait``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from alignkit.rewards.base import RewardSource, Score, ScoreMeta

T = TypeVar("T")


class BackgroundScorer:
    """``submit(prompts, responses, meta)`` returns a ``concurrent.futures.Future[list[Score]]``."""

    def __init__(self, source: RewardSource):
        self.source = source
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="alignkit-scorer", daemon=True)
        self._thread.start()
        self._closed = False

    def submit(
        self, prompts: Sequence[str], responses: Sequence[str], meta: ScoreMeta | None = None
    ) -> concurrent.futures.Future[list[Score]]:
        # Copy: the caller may reuse its lists while the scoring is still running.
        return self.run_async(self.source.score(list(prompts), list(responses), meta))

    def run_async(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule any coroutine on the scoring loop (e.g. ``source.health_check()``)."""
        if self._closed:
            coro.close()
            raise RuntimeError("BackgroundScorer is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the scoring loop and wait for its result."""
        return self.run_async(coro).result(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Close the source on its loop (``aclose``), then stop and join the thread."""
        if self._closed:
            return
        try:
            self.run(self.source.aclose(), timeout)
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> BackgroundScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
