"""What a failed score does to a step: ``on_failure`` and ``max_failure_rate``.

A failure is never turned into 0 silently. ``skip`` masks the sample out of the update,
``zero`` scores it 0.0 (only sensible when 0 means "bad" for this reward), ``fail`` stops the
run at the first failure; in every mode a step whose failed fraction exceeds
``max_failure_rate`` stops the run with the reasons.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from alignkit.rewards.base import RewardError, Score

OnFailure = Literal["skip", "zero", "fail"]


class RewardFailureError(RewardError):
    """Too many scores of a step failed (``max_failure_rate``), or one did under ``on_failure: fail``."""


@dataclass(frozen=True)
class FailurePolicy:
    """``on_failure`` and ``max_failure_rate`` (their defaults live in ``RewardSpec``)."""

    on_failure: OnFailure
    max_failure_rate: float

    def __post_init__(self) -> None:
        if self.on_failure not in ("skip", "zero", "fail"):
            raise ValueError(f"on_failure must be skip, zero or fail, got {self.on_failure!r}")
        if not 0.0 <= self.max_failure_rate <= 1.0:
            raise ValueError(f"max_failure_rate must be in [0, 1], got {self.max_failure_rate}")

    def apply(self, scores: Sequence[Score]) -> tuple[list[float], list[bool], int]:
        """``(values, valid, n_failed)`` for one step's scores.

        A failed sample holds the placeholder 0.0 in ``values``: with ``skip`` its ``valid`` is
        False and the placeholder must not be used; with ``zero`` it is valid and counts as 0.0.
        Raises ``RewardFailureError`` naming the newest distinct reasons.
        """
        reasons = [s.reason or "unknown" for s in scores if not s.ok]
        n_failed, n = len(reasons), len(scores)
        last = "; ".join(list(dict.fromkeys(reversed(reasons)))[:3])
        if n_failed and self.on_failure == "fail":
            raise RewardFailureError(
                f"{n_failed} of {n} scores failed and on_failure is 'fail'; last reasons: {last}"
            )
        if n and n_failed / n > self.max_failure_rate:
            raise RewardFailureError(
                f"{n_failed} of {n} scores failed ({n_failed / n:.0%}), above "
                f"max_failure_rate={self.max_failure_rate:g}; last reasons: {last}"
            )
        values = [s.value if s.value is not None else 0.0 for s in scores]
        valid = [s.ok or self.on_failure == "zero" for s in scores]
        return values, valid, n_failed
