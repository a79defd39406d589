"""Rank agreement: does the judge still order the same answers the same way?

The reward probe re-scores fixed reference answers through the run; a judge whose mean stays put can
still reshuffle them (a changed model behind the same URL, a new rubric, a drifting sampler). The
Spearman rank correlation between the probe's scores now and at its first probe measures that:
1 is the same order, 0 none.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, tied values sharing their average rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i : j + 1]:
            out[k] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of the ranks (tie-corrected); NaN with fewer than 3 points or a constant side."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} and {len(y)} values")
    if len(x) < 3:
        return math.nan
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx and vy else math.nan


class RankDrift:
    """Keeps the first probe's scores; ``__call__`` gives the rank agreement of later ones with them."""

    def __init__(self) -> None:
        self.first: list[float | None] | None = None

    def __call__(self, scores: list[float | None]) -> float:
        """``scores``: one per probe row, ``None`` where it failed (left out of both sides)."""
        if self.first is None:
            self.first = list(scores)
        both = [(a, b) for a, b in zip(self.first, scores, strict=True) if a is not None and b is not None]
        return spearman([a for a, _ in both], [b for _, b in both])
