"""Each response to the reward service as soon as it is finished, not when its chunk is.

An engine that reports finished rows (``RolloutEngine.reports_finished``: hf, vllm_server) calls
``BatchScoring.on_finished`` as each response samples its stop token; the response is decoded and
submitted at once, so a slow judge starts on the first short answers while the long ones still
decode. What one submission holds is the service's ``unit``: one sample, a prompt's whole group
(listwise, pairwise judges: sent when its last response is finished) or the chunk (reward models,
judges packing samples per request: today's per-chunk submission). Responses cut at
``max_new_tokens`` are submitted when the chunk ends. Scores are collected in batch order, so
failures keep their meaning (masked, counted, out of baselines, ``max_failure_rate`` per batch).
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from alignkit.generation.sampling import OnFinished
from alignkit.rewards.base import Score, ScoreMeta
from alignkit.rewards.service import RewardService

if TYPE_CHECKING:  # experience.py imports this module
    from alignkit.train.ppo.experience import PromptSet, RolloutSettings


def score_meta(prompts: PromptSet, ids: list[int], resp_ids: list[list[int]], settings: RolloutSettings) -> ScoreMeta:
    """Labels, the templated prompts and full responses that full-text presets (llamafactory,
    openrlhf) send as those trainers do, and each prompt's image paths (so a judge sees what was asked)."""
    return ScoreMeta(
        labels=[prompts.labels[i] for i in ids],
        templated_prompts=None if prompts.templated is None else [prompts.templated[i] for i in ids],
        full_responses=None if settings.decode_full is None else settings.decode_full(
            [prompts.queries[i] for i in ids], resp_ids),
        images=None if prompts.images is None else [tuple(prompts.images[i]) for i in ids],
    )


@dataclass
class BatchScoring:
    """The submissions of one batch. ``prompts`` is the run's ``PromptSet``, ``idx`` each batch
    row's dataset row (B,), groups of ``settings.num_generations`` contiguous."""

    service: RewardService
    settings: RolloutSettings
    prompts: PromptSet
    idx: list[int]
    futures: list[concurrent.futures.Future[list[Score]]] = field(default_factory=list)
    rows: list[list[int]] = field(default_factory=list)  # the batch rows of each future, in its order
    texts: dict[int, str] = field(default_factory=dict)  # batch row -> response text as scored
    _ids: dict[int, list[int]] = field(default_factory=dict)  # batch row -> response ids, once finished
    _sent: dict[tuple, int] = field(default_factory=dict)  # a sample already submitted -> its future

    def on_finished(self, offset: int) -> OnFinished | None:
        """The callback for the chunk whose first batch row is ``offset`` (None: per-chunk scoring)."""
        if self.service.unit == "chunk":
            return None
        return lambda row, ids: self._finished(offset + row, ids)

    def _finished(self, row: int, ids: list[int]) -> None:
        self._ids[row] = ids
        if self.service.unit == "sample":
            self._submit([row])
            return
        g = self.settings.num_generations
        members = list(range(row - row % g, row - row % g + g))
        if all(m in self._ids for m in members):  # the group's last response: the judge compares them all
            self._submit(members)

    def end_chunk(self, offset: int, response_ids: list[list[int]]) -> None:
        """The chunk is sampled: submit every row not yet submitted (cut at max_new_tokens, a group
        still missing one, or all of them for per-chunk scoring), in one call."""
        for i, ids in enumerate(response_ids):
            if self._ids.setdefault(offset + i, ids) != ids:  # the engine reported other tokens than it returned
                raise RuntimeError(f"row {offset + i}: the engine reported response {self._ids[offset + i]} as "
                                   f"finished but returned {ids}")
        rest = [offset + i for i in range(len(response_ids)) if offset + i not in self.texts]
        if rest:
            self._submit(rest)

    def _submit(self, rows: list[int]) -> None:
        resp = [self._ids[r] for r in rows]
        texts = self.settings.decode(resp)
        self.texts.update(zip(rows, texts, strict=True))
        ids = [self.idx[r] for r in rows]
        prompts = [self.prompts.texts[i] for i in ids]
        meta = score_meta(self.prompts, ids, resp, self.settings)
        key = _sample_key(prompts, texts, meta) if len(rows) == 1 else None
        if key is not None and key in self._sent:  # an identical sample (a duplicate in its group) is asked once,
            future = self.futures[self._sent[key]]  # as one per-chunk call would have sent it
        else:
            future = self.service.submit(prompts, texts, meta)
            if key is not None:
                self._sent[key] = len(self.futures)
        self.futures.append(future)
        self.rows.append(rows)


def _sample_key(prompts: list[str], texts: list[str], meta: ScoreMeta) -> tuple:
    """Everything a judge may be sent about one sample."""
    one = lambda values: None if values is None else values[0]  # noqa: E731
    return (prompts[0], texts[0], one(meta.labels), one(meta.images), one(meta.templated_prompts),
            one(meta.full_responses))
