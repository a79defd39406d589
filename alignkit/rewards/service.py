"""The one object a training loop scores with: submit responses as they are ready, collect a batch.

Scoring runs on a background event loop (``BackgroundScorer``), so a response submitted as soon
as it is finished is scored while the engine samples the rest and the loop runs its forward
passes. ``unit`` says what one submission holds: a sample (rules, pointwise judges), a group
(listwise and pairwise judges compare a prompt's responses) or a chunk (a reward model's batched
forward, a judge that packs several samples per request). ``collect`` waits for them, puts the
scores back in batch order, applies the failure policy and returns plain lists; the loop never
knows whether a rule, a reward model or an HTTP judge produced them.
"""

from __future__ import annotations

import concurrent.futures
import logging
from dataclasses import dataclass, field
from typing import Literal

from alignkit.rewards.base import Score, ScoreMeta
from alignkit.rewards.factory import HealthCheck, build_reward
from alignkit.rewards.failures import FailurePolicy
from alignkit.rewards.runner import BackgroundScorer
from alignkit.rewards.spec import RewardContext, RewardSpec
from alignkit.rewards.text import decode_for_reward, joint_responses
from alignkit.rewards.wrappers import CountFailures

logger = logging.getLogger(__name__)

ScoringUnit = Literal["sample", "group", "chunk"]


@dataclass
class ScoredBatch:
    """One step's scores, in submission order."""

    values: list[float]  # failed samples hold 0.0 placeholders (never used when valid is False)
    valid: list[bool]  # False: mask the sample out of the update (on_failure: skip)
    n_failed: int
    # Source counters since the last collect: reward/failures, reward/cache_hits,
    # reward/latency_p50/p95, reward/extra/*, rollout/think_truncated_frac (with strip_think).
    metrics: dict[str, float]
    reasons: list[str | None]  # per sample: why its score failed (secrets scrubbed), None when it did not
    # per sample: its rubric's per-criterion scores (judge criteria), None for other sources or failures
    details: list[dict[str, float] | None] = field(default_factory=list)


class RewardService:
    """A wrapped reward source on its own scoring thread, with the step's failure policy."""

    def __init__(
        self,
        source: CountFailures,
        policy: FailurePolicy,
        include_special_tokens: bool = False,
        health_check: HealthCheck | None = None,
        keep_tokens: tuple[str, ...] = (),
        unstripped_think: tuple[str, ...] = (),
        unit: ScoringUnit = "chunk",
    ) -> None:
        self.unit = unit  # what one submission holds (module doc)
        self.include_special_tokens = include_special_tokens  # how the trainer decodes responses
        self.keep_tokens = keep_tokens  # special tokens kept in the response text anyway (think tags)
        self._watch = unstripped_think  # think tags that reach the judge (strip_think off): warn once if seen
        self._source = source
        self._policy = policy
        self._health_check = health_check
        self._scorer = BackgroundScorer(source)

    def response_texts(self, tokenizer, rows: list[list[int]]) -> list[str]:
        """Response token ids (one row per sample, no padding) as the text this source scores."""
        texts = decode_for_reward(tokenizer, rows, self.include_special_tokens, self.keep_tokens)
        if self._watch and self._has_thoughts(tokenizer, rows, texts):
            logger.warning(
                "responses contain thoughts (%s ... %s) and strip_think is off, so the judge scores the thought "
                "with the answer%s. Set strip_think: true to score the answer only (this warning is shown once).",
                *self._watch, "" if self.include_special_tokens else " (tags that are special tokens are dropped)")
            self._watch = ()
        return texts

    def _has_thoughts(self, tokenizer, rows: list[list[int]], texts: list[str]) -> bool:
        # A tag that is a special token is dropped from the text, so look for its id as well.
        ids = {tokenizer.convert_tokens_to_ids(t) for t in self._watch} - {None, tokenizer.unk_token_id}
        return any(t in text for text in texts for t in self._watch) or any(i in ids for r in rows for i in r)

    @staticmethod
    def full_texts(tokenizer, rows: list[list[int]]) -> list[str]:
        """Token ids with every special token kept: ``ScoreMeta``'s templated prompts and full responses."""
        return decode_for_reward(tokenizer, rows, include_special_tokens=True)

    @staticmethod
    def joint_responses(tokenizer, query_rows: list[list[int]], response_rows: list[list[int]]) -> list[str]:
        """``ScoreMeta.full_responses``: each response as it reads after its templated prompt in one
        decode of prompt + response (special tokens kept), so prompt + response is that decode."""
        return joint_responses(tokenizer, query_rows, response_rows)

    def start(self) -> None:
        """Probe the judge once before training, when it has a start-up check and it is enabled;
        raises ``RewardApiError`` showing the request and the reply."""
        if self._health_check is not None:
            self._scorer.run(self._health_check())

    def submit(
        self, prompts: list[str], responses: list[str], meta: ScoreMeta
    ) -> concurrent.futures.Future[list[Score]]:
        """Start scoring one chunk now, on the background loop."""
        return self._scorer.submit(prompts, responses, meta)

    def score_side(self, prompts: list[str], responses: list[str], meta: ScoreMeta) -> list[Score]:
        """Score outside the step (canaries): waits for the scores. Its failures are the caller's to
        count (not ``reward/failures``, which is the step's), while its requests and tokens stay in the
        source's counters, so the next ``collect`` reports them with the step that follows."""
        return self._scorer.run(self._source.inner.score(prompts, responses, meta))

    def collect(self, futures: list[concurrent.futures.Future[list[Score]]],
                rows: list[list[int]] | None = None) -> ScoredBatch:
        """Wait for the submissions, put their scores in batch order (``rows[i]``: the batch rows of
        ``futures[i]``; None: the futures are in order) and apply the failure policy to the batch.

        Raises ``RewardFailureError`` past ``max_failure_rate`` or on any failure under
        ``on_failure: fail``.
        """
        if rows is None:
            scores = [s for f in futures for s in f.result()]
        else:
            placed: dict[int, Score] = {}
            for f, rr in zip(futures, rows, strict=True):
                placed.update(zip(rr, f.result(), strict=True))
            scores = [placed[i] for i in range(len(placed))]
        metrics = self._source.metrics()
        values, valid, n_failed = self._policy.apply(scores)
        return ScoredBatch(values, valid, n_failed, metrics, [None if s.ok else s.reason or "unknown" for s in scores],
                           [s.details if s.ok else None for s in scores])

    def failure_summary(self) -> dict[str, int]:
        """Failures over the whole run, per kind of reason."""
        return self._source.failure_summary()

    def close(self) -> None:
        """Close the source (judge session, cache file) and stop the scoring thread; idempotent."""
        self._scorer.close()


def build_reward_service(spec: RewardSpec, context: RewardContext, policy_model=None) -> RewardService:
    """The service for ``spec``; ``policy_model`` is the trainer's ``ActorCritic`` (a ``lora``
    reward model puts its adapter on that model's base and takes turns with it)."""
    built = build_reward(spec, context, policy_model)
    policy = FailurePolicy(spec.on_failure, spec.max_failure_rate)
    keep = tuple(spec.think_tags) if spec.strip_think else ()
    watch = () if spec.strip_think else tuple(spec.think_tags)
    return RewardService(built.source, policy, spec.include_special_tokens, built.health_check, keep, watch,
                         scoring_unit(spec))


def scoring_unit(spec: RewardSpec) -> ScoringUnit:
    """What one submission should hold for ``spec``'s source to score as it would a whole chunk:
    a rule or a one-sample-per-request judge scores each response alone; listwise and pairwise
    judges need a prompt's whole group; a reward model batches its forward passes and a judge with
    ``batch_size > 1`` packs samples per request, so they keep the chunk."""
    if spec.reward_model_type == "rule":
        return "sample"
    if spec.reward_model_type == "api":
        api = spec.api_settings()
        if getattr(api, "judge_mode", "pointwise") != "pointwise":
            return "group"
        return "sample" if api.batch_size == 1 else "chunk"
    return "chunk"
