"""``max_tokens_per_minute``: the judge's token quota, as hosted APIs enforce it (TPM).

A request's tokens are known only from its reply's ``usage``, so a request reserves an estimate
(its body's characters / 4, OpenAI's rule of thumb for English) when it starts, and the reply's
real total replaces it. A request waits while the last minute's tokens plus its estimate exceed
the limit (verl added the same rpm/tpm pair, PR #4107); one alone larger than the limit still goes
when the minute is empty, so it cannot wait forever.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable

WINDOW_S = 60.0


def estimate_tokens(body: bytes) -> int:
    return max(1, len(body) // 4)


class TokenBudget:
    """Tokens spent per rolling minute; one per ``ApiReward`` (its requests share one event loop)."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self.limit, self.clock, self.sleep = per_minute, clock, sleep
        self.spent: deque[list[float]] = deque()  # [start time, tokens], oldest first

    def used(self) -> float:
        """Tokens of the requests started in the last minute (estimates until their replies settle them)."""
        horizon = self.clock() - WINDOW_S
        while self.spent and self.spent[0][0] <= horizon:
            self.spent.popleft()
        return sum(tokens for _, tokens in self.spent)

    async def acquire(self, estimate: int) -> list[float]:
        """Wait for room for ``estimate`` tokens; the returned entry is settled with the real count."""
        while self.used() + estimate > self.limit and self.spent:  # used() first: it drops old entries
            await self.sleep(max(self.spent[0][0] + WINDOW_S - self.clock(), 0.01))
        entry = [self.clock(), float(estimate)]
        self.spent.append(entry)  # no await between the check and here: requests on one loop cannot race
        return entry

    @staticmethod
    def settle(entry: list[float], tokens: int) -> None:
        entry[1] = float(tokens)
