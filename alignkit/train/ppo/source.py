"""The producer side of an RL step: an ``ExperienceSource`` makes the Experience the learner consumes.

Today's on-policy loop is the zero-lag case: the source samples with the policy the learner has
just updated (``policy_version`` = updates so far), and the learner trains on it before the next
call. ``DynamicSampling`` (DAPO, Yu et al. 2025 sec. 3.2) is a source that keeps sampling until
the batch is filled with groups that carry a learning signal.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from alignkit.generation import RolloutEngine
from alignkit.models.actor_critic import ActorCritic
from alignkit.rewards.service import RewardService
from alignkit.train.ppo.experience import (
    Experience,
    PendingExperience,
    PromptSet,
    Requested,
    RolloutSettings,
    begin_experience,
    concat,
    finish_experience,
    make_experience,
    request_rollouts,
    select,
)

# (step, round) -> this rank's prompt rows. Round 0 is the step's own batch; later rounds (dynamic
# sampling) draw other prompts, deterministically, so a resumed run samples the same ones.
BatchIndices = Callable[[int, int], list[int]]


@dataclass
class ExperienceSource:
    """Samples, scores and runs the no-grad passes over one rank's batch of prompts per step."""

    ac: ActorCritic
    engine: RolloutEngine
    service: RewardService
    settings: RolloutSettings
    prompts: PromptSet
    batch_indices: BatchIndices

    def experience(self, step: int, policy_version: int) -> Experience:
        """The Experience of ``step``, sampled by the policy after ``policy_version`` updates."""
        return self.sample(step, 0, policy_version)

    def sample(self, step: int, round_: int, policy_version: int) -> Experience:
        return make_experience(self.ac, self.engine, self.service, self.settings, self.prompts,
                               self.batch_indices(step, round_), policy_version)


@dataclass
class PipelinedSource(ExperienceSource):
    """Asynchronous off-policy RL with a staleness bound (``async_level: k``): up to ``k + 1``
    batches are in flight. At step t the source first starts batch t + k (sampled by the current
    policy, its scoring submitted at once), then finishes batch t, which was sampled k updates ago
    and whose scores have arrived during the k rollouts and updates since. Judge latency leaves the
    critical path; the learner corrects for the lag with importance weights (``algos.correction``).

    With an in-process engine, sampling and updating never overlap in time (one thread), so no
    engine can sample from weights that are half updated. An engine that runs ahead (the hf rollout
    worker, ``rollout.worker: process``) is only asked for batch t + k here and samples it while
    the learner updates; it takes new weights between two rollouts only, and the batch is taken
    (forward passes, scores) when the learner reaches it. Batches in flight at a checkpoint are
    not saved: a resumed run starts them again from the checkpoint's policy (docs/algorithms.md)."""

    async_level: int = 1
    num_steps: int = 0  # the run's last step: nothing is sampled past it
    queue: deque[PendingExperience | Requested] = field(default_factory=deque)
    next_step: int | None = None
    handed_at: float | None = None  # when the last batch went to the learner

    def experience(self, step: int, policy_version: int) -> Experience:
        if self.next_step is None:  # the first step of this process (a resumed run starts empty)
            self.next_step = step
        # In process, the producer cannot sample while the learner updates: it waited since the
        # last hand-over. A worker process times its own idle spells (PendingExperience).
        producer_wait = None if self.handed_at is None else time.perf_counter() - self.handed_at
        ahead = getattr(self.engine, "runs_ahead", False)
        start = request_rollouts if ahead else begin_experience
        while self.next_step < min(step + self.async_level + 1, self.num_steps):
            self.queue.append(start(self.ac, self.engine, self.service, self.settings, self.prompts,
                                    self.batch_indices(self.next_step, 0), policy_version))
            self.next_step += 1
        t0 = time.perf_counter()
        pending = self.queue.popleft()
        if ahead:
            pending = begin_experience(self.ac, self.engine, self.service, self.settings, self.prompts, [],
                                       requested=pending)
        exp = finish_experience(self.service, pending)
        if ahead:  # its no-grad passes ran just now, with the learner's current weights
            exp.logprobs_version = policy_version
        exp.stats.timing["async/learner_wait_s"] = time.perf_counter() - t0
        if ahead:
            producer_wait = pending.producer_wait_s
        if producer_wait is not None:
            exp.stats.timing["async/producer_wait_s"] = producer_wait
        self.handed_at = time.perf_counter()
        return exp


def informative_groups(exp: Experience) -> tuple[list[list[int]], list[list[int]]]:
    """The rows of each group, in order, split into (informative, not): a group is informative
    when at least two of its scores are valid and they are not all equal (any group baseline then
    gives some sample a non-zero advantage)."""
    groups: dict[int, list[int]] = {}
    for row, g in enumerate(exp.group_ids.tolist()):
        groups.setdefault(g, []).append(row)
    good, flat = [], []
    for rows in groups.values():
        scores = exp.scores[rows][exp.valid[rows].bool()]
        (good if len(scores) >= 2 and float(scores.max() - scores.min()) > 1e-6 else flat).append(rows)
    return good, flat


@dataclass
class DynamicSampling(ExperienceSource):
    """DAPO's dynamic sampling: sample round after round (other prompts each time) until the batch
    holds ``n_prompts`` informative groups, for at most ``max_rounds`` rounds; fill what is still
    missing with uninformative groups, so every step trains on the same number of samples.

    ``agree(need_more)`` is True when any rank needs another round: every rank then samples one
    more (a ZeRO-3 rollout gathers the policy collectively, so all ranks run the same rounds)."""

    n_prompts: int = 1
    max_rounds: int = 3
    agree: Callable[[bool], bool] = bool

    def experience(self, step: int, policy_version: int) -> Experience:
        rounds: list[Experience] = []
        good: list[tuple[int, list[int]]] = []  # (round, rows) of informative groups
        flat: list[tuple[int, list[int]]] = []
        for r in range(self.max_rounds):
            exp = self.sample(step, r, policy_version)
            rounds.append(exp)
            g, f = informative_groups(exp)
            good += [(r, rows) for rows in g]
            flat += [(r, rows) for rows in f]
            if not self.agree(len(good) < self.n_prompts):
                break
        chosen = (good + flat)[: self.n_prompts]
        # Keep each round's chosen groups in sampling order, then one batch of them all.
        parts = [select(exp, [row for rr, rows in chosen if rr == r for row in rows]) for r, exp in enumerate(rounds)]
        parts = [p for p in parts if len(p.texts)] or [select(rounds[0], [])]
        batch = concat(parts, self.settings.pad_token_id)
        # Every round's cost and counters count, including the groups left out.
        stats = rounds[0].stats
        for e in rounds[1:]:
            stats = stats.merge(e.stats)
        batch.stats = stats
        batch.stats.failure_reasons = [r for p in parts for r in p.stats.failure_reasons]
        batch.stats.score_details = ([d for p in parts for d in p.stats.score_details or [None] * len(p.texts)]
                                     if any(p.stats.score_details for p in parts) else [])
        return batch


def rank_indices(n: int, global_bs: int, seed: int, rank: int, world: int,
                 batch_indices: Callable[[int, int, int, int], list[int]]) -> BatchIndices:
    """``BatchIndices`` for this rank: its share of the global batch of round 0 (today's order),
    and for round r > 0 the batch the same step would have with seed ``seed + r`` (other prompts)."""
    return lambda step, round_: batch_indices(n, step, global_bs, seed + 7919 * round_)[rank::world]


def any_rank(accelerator) -> Callable[[bool], bool]:
    """True on every rank when ``flag`` is True on any."""
    return lambda flag: bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "sum") > 0)
