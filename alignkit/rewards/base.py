"""The one interface the trainer sees: a reward source scores (prompt, response) pairs.

A score is a float or a failure with a reason. A failure is never turned into 0 here; what
happens to it (skip the sample, zero it, stop the run) is the caller's documented choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


class RewardError(RuntimeError):
    """Scoring cannot go on: a source that cannot be used, or too many failed scores."""


@dataclass(frozen=True)
class Score:
    """A reward value, or a failure (``value is None``) with the reason it failed."""

    value: float | None
    reason: str | None = None
    cached: bool = False
    latency_s: float | None = None
    # The rubric's per-criterion scores behind ``value`` (judge criteria; ``None`` for other sources).
    details: dict[str, float] | None = None

    @property
    def ok(self) -> bool:
        return self.value is not None

    @classmethod
    def failure(cls, reason: str, latency_s: float | None = None) -> Score:
        return cls(None, reason, latency_s=latency_s)


@dataclass
class ScoreMeta:
    """Per-sample side information: the dataset label (reference answer), the texts exactly as
    the policy saw and wrote them (for judges that read chat markers or the system prompt, such
    as LLaMA-Factory's and OpenRLHF's), and free extras. The texts are ``None`` outside training."""

    labels: Sequence[str | None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # The prompt as the policy saw it: chat template, system prompt, special tokens (decoded query ids).
    templated_prompts: Sequence[str] | None = None
    # The response decoded with its special tokens, the end-of-turn token included.
    full_responses: Sequence[str] | None = None
    # Each prompt's images (absolute paths, in placeholder order; empty for a text prompt): what a
    # judge needs to see to know what was asked. ``None`` when no prompt has an image.
    images: Sequence[tuple[str, ...]] | None = None
    # Each row's own rubric (``reward_api.criteria_column``), as canonical JSON of its criteria;
    # ``None`` where the row has none. ``None`` when no row has one.
    criteria: Sequence[str | None] | None = None

    def select(self, indices: Sequence[int]) -> ScoreMeta:
        """The meta of the samples at ``indices`` (a wrapper passes only some samples on)."""

        def pick(values: Sequence[Any] | None) -> list[Any] | None:
            return None if values is None else [values[i] for i in indices]

        return ScoreMeta(pick(self.labels), self.extra, pick(self.templated_prompts), pick(self.full_responses),
                         pick(self.images), pick(self.criteria))


def images_for(meta: ScoreMeta | None, n: int) -> list[tuple[str, ...]]:
    """Each sample's image paths (``()`` for a text prompt); checks the count."""
    images = list(meta.images) if meta is not None and meta.images is not None else [()] * n
    if len(images) != n:
        raise ValueError(f"score(): {n} responses but {len(images)} image lists")
    return [tuple(i) for i in images]


def criteria_for(meta: ScoreMeta | None, n: int) -> list[str | None]:
    """Each sample's row rubric (canonical JSON, ``None`` where the row has none); checks the count."""
    rubrics = list(meta.criteria) if meta is not None and meta.criteria is not None else [None] * n
    if len(rubrics) != n:
        raise ValueError(f"score(): {n} responses but {len(rubrics)} row rubrics")
    return rubrics


def labels_for(meta: ScoreMeta | None, n: int) -> list[str | None]:
    """One label per sample (``None`` where the dataset has none); checks the count."""
    labels = list(meta.labels) if meta is not None and meta.labels is not None else [None] * n
    if len(labels) != n:
        raise ValueError(f"score(): {n} responses but {len(labels)} labels")
    return labels


@runtime_checkable
class RewardSource(Protocol):
    """API, trained-model, rule and Python-function rewards all implement this."""

    async def score(
        self, prompts: Sequence[str], responses: Sequence[str], meta: ScoreMeta | None = None
    ) -> list[Score]: ...

    async def aclose(self) -> None: ...

    def metrics(self) -> dict[str, float]:
        """Counters since the last call (e.g. ``reward/cache_hits``), reset on read."""
        ...
