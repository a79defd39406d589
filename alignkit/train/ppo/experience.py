"""One rollout batch as an ``Experience``: sample, submit for scoring, forward passes, collect.

``make_experience`` is phase one of a PPO step (TRL 0.11's ``generate`` + ``batched_forward_pass``):
it returns plain tensors the later phases (shaping, advantages, update, metrics) read, the policy
version that sampled them, the engine's own (behaviour) log-probs when it reports them, and the
batch's ``RolloutStats``. ``BatchScoring`` submits each response for scoring as soon as it is
finished. ``concat`` and ``Experience.select`` re-batch experiences (dynamic sampling).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch

from alignkit.algos import kl_penalty, logprobs_from_logits
from alignkit.data.collators import pad_left
from alignkit.data.vision import PixelRows, VisionProcessor
from alignkit.generation import Rollout, RolloutEngine, SamplingParams, SyncCheck
from alignkit.generation.sampling import OnFinished
from alignkit.models.actor_critic import ActorCritic
from alignkit.rewards.base import Score, ScoreMeta
from alignkit.rewards.service import RewardService, ScoredBatch


@dataclass(frozen=True)
class PromptSet:
    """The dataset's prompts, by row: template-encoded ids, the text the reward sees, labels."""

    queries: list[list[int]]
    texts: list[str]
    labels: list[str | None]
    templated: list[str] | None = None  # the queries decoded with special tokens: what full-text judges read
    images: list[list[str]] | None = None  # per row, its image paths (what the reward is shown); None: text only
    criteria: list[str | None] | None = None  # per row, its own rubric (reward_api.criteria_column) as JSON text
    vision: VisionProcessor | None = None  # makes the pixel inputs of a batch's image rows (a VL model)

    def pixel_rows(self, idx: list[int], device: torch.device) -> PixelRows | None:
        """The pixel inputs of rows ``idx`` (a group repeats its prompt's); None when none has an image."""
        if self.vision is None or self.images is None or not any(self.images[i] for i in idx):
            return None
        return PixelRows.build(self.vision, [self.images[i] for i in idx], device)


@dataclass(frozen=True)
class RolloutSettings:
    """How one rank turns prompts into an Experience."""

    sampling: SamplingParams
    num_generations: int  # responses per prompt, sampled in the same batch (a group)
    chunk_size: int  # prompts per engine call; each chunk's scoring starts as soon as it is sampled
    forward_batch_size: int  # rows per no-grad forward pass (per_device_eval_batch_size)
    kl_estimator: str  # kl | abs | mse | full
    pad_token_id: int
    decode: Callable[[list[list[int]]], list[str]]  # response ids -> the text the reward scores
    need_reference: bool = True  # False: no reference pass, KL is zero (runs with a KL coefficient of 0)
    # (query ids, response ids) -> each response as it reads after its prompt in one joint decode
    decode_full: Callable[[list[list[int]], list[list[int]]], list[str]] | None = None
    # Entered once around the whole rollout: ZeRO-3 gathers the policy there (sharding.rollout_context).
    gather: Callable[[], AbstractContextManager] = nullcontext


@dataclass
class RolloutStats:
    """What making one Experience cost and what the reward service counted on the way."""

    timing: dict[str, float] = field(default_factory=dict)  # time/generate, time/rollout, time/score_wait
    n_failed: int = 0  # failed scores (masked out of the update, never zero-filled)
    failure_reasons: list[str | None] = field(default_factory=list)  # per sample, None where the score is valid
    reward_metrics: dict[str, float] = field(default_factory=dict)  # the reward service's counters
    sync: SyncCheck | None = None  # the engine's log-probs against the trainer's (engines that report them)
    rounds: int = 1  # sampling rounds that made the batch (dynamic sampling)
    n_samples: int = 0  # responses sampled and scored, including any a dynamic sampler left out
    score_details: list[dict[str, float] | None] = field(default_factory=list)  # per sample: criterion scores

    def rows(self, rows: list[int]) -> RolloutStats:
        """These stats with the per-sample lists cut to ``rows``."""
        return dataclasses.replace(self, failure_reasons=[self.failure_reasons[r] for r in rows],
                                   score_details=[self.score_details[r] for r in rows] if self.score_details else [])

    def merge(self, other: RolloutStats) -> RolloutStats:
        """Two rounds' stats: times and counters summed, the worse sync check kept."""
        counters = {k: self.reward_metrics.get(k, 0.0) + other.reward_metrics.get(k, 0.0)
                    for k in set(self.reward_metrics) | set(other.reward_metrics)}
        syncs = [c for c in (self.sync, other.sync) if c is not None]
        return RolloutStats(
            {k: self.timing.get(k, 0.0) + other.timing.get(k, 0.0) for k in set(self.timing) | set(other.timing)},
            self.n_failed + other.n_failed, self.failure_reasons + other.failure_reasons, counters,
            max(syncs, key=lambda c: c.logprob_diff) if syncs else None, self.rounds + other.rounds,
            self.n_samples + other.n_samples, _joined(self, other))


def _joined(a: RolloutStats, b: RolloutStats) -> list[dict[str, float] | None]:
    """Two batches' per-sample criterion scores, in order (empty when neither has any)."""
    if not a.score_details and not b.score_details:
        return []
    return (a.score_details or [None] * len(a.failure_reasons)) + (b.score_details or [None] * len(b.failure_reasons))


@dataclass
class Experience:
    """One rank's rollout batch of B = prompts x num_generations samples, each prompt's group
    contiguous. Q = padded prompt length, R = longest response."""

    input_ids: torch.Tensor  # (B, Q+R) left-padded prompt, right-padded response
    attention_mask: torch.Tensor  # (B, Q+R)
    query_len: int  # Q
    response_mask: torch.Tensor  # (B, R) float: response tokens up to and including the first EOS
    no_eos: torch.Tensor  # (B,) bool: hit max_new_tokens without EOS
    logprobs: torch.Tensor  # (B, R) log-probs of the sampling policy (the trainer's own forward pass)
    ref_logprobs: torch.Tensor  # (B, R) reference log-probs
    values: torch.Tensor | None  # (B, R) critic values; None without a critic
    kl: torch.Tensor  # (B, R) per-token KL estimate, policy vs reference
    scores: torch.Tensor  # (B,) raw scores; 0.0 placeholders where the score failed
    valid: torch.Tensor  # (B,) float: 1 where the score may be used (in the update and in any baseline)
    group_ids: torch.Tensor  # (B,) the prompt's dataset row: samples of one group share it
    texts: list[str]  # responses as sent to the reward
    stats: RolloutStats = field(default_factory=RolloutStats)
    policy_version: int = 0  # optimizer updates the sampling policy had seen (the learner's step count)
    behaviour_logprobs: torch.Tensor | None = None  # (B, R) the engine's own log-probs of its samples, if any
    # The policy version of ``logprobs`` when it is not ``policy_version``: a rollout worker's batch
    # gets the learner's pass when the learner takes it, already the current (proximal) policy's.
    logprobs_version: int | None = None
    keep: torch.Tensor | None = None  # (B,) float: 0 drops a valid sample from the loss only (filters)
    # Off-policy correction set by the learner (algos.correction): (B, R) weights of each token's loss
    # term and (B, R) 0/1 tokens kept (MIS); None: on-policy, a weight of exactly 1.
    is_weights: torch.Tensor | None = None
    is_mask: torch.Tensor | None = None
    pixels: PixelRows | None = None  # per sample, its prompt's image inputs (Qwen-VL); None: a text batch

    def pixels_of(self, rows: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Forward kwargs with the images of ``rows`` (in that order), for every pass over them."""
        return None if self.pixels is None else self.pixels.select(rows)

    @property
    def scored_mask(self) -> torch.Tensor:
        """(B, R) response tokens of samples with a valid score: what estimators and baselines read."""
        return self.response_mask * self.valid[:, None]

    @property
    def mask(self) -> torch.Tensor:
        """(B, R) tokens that enter the update: failed samples are masked out, never zero-scored,
        and samples a filter dropped (``keep``) too."""
        return self.scored_mask if self.keep is None else self.scored_mask * self.keep[:, None]


def pad_right(t: torch.Tensor, length: int, value: float = 0) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)


@torch.no_grad()
def response_stats(ac: ActorCritic, roll: Rollout, settings: RolloutSettings,
                   pixels: PixelRows | None = None) -> tuple[torch.Tensor, ...]:
    """Old log-probs, values (or an empty tensor), reference log-probs and KL of one chunk, (b, R)
    each, ``forward_batch_size`` rows at a time so ``full`` KL never holds the chunk's logits.
    ``pixels``: the chunk's rows' image inputs."""
    temperature, q = settings.sampling.temperature, roll.query_len
    parts = []
    for m in range(0, roll.input_ids.shape[0], settings.forward_batch_size):
        ids, attn = roll.input_ids[m : m + settings.forward_batch_size], roll.attention_mask[m : m + settings.forward_batch_size]
        rows = pixels.select(range(m, m + ids.shape[0])) if pixels is not None else None
        logits, values = ac(ids, attn, q, rows)  # (b, R, V), (b, R) or None
        logp = logprobs_from_logits(logits, ids[:, q:], temperature)
        if settings.need_reference:
            ref_logits = ac.reference_logits(ids, attn, q, rows)
            ref_logp = logprobs_from_logits(ref_logits, ids[:, q:], temperature)
            full = settings.kl_estimator == "full"
            kl = kl_penalty(logp, ref_logp, settings.kl_estimator, logits if full else None,
                            ref_logits if full else None, temperature)
        else:
            ref_logp, kl = logp, torch.zeros_like(logp)
        # Without a critic the values slot holds zeros, dropped when the Experience is built.
        parts.append((logp, values.float() if values is not None else torch.zeros_like(logp), ref_logp, kl))
    return tuple(torch.cat(p) for p in zip(*parts, strict=True))


def response_rows(roll: Rollout) -> list[list[int]]:
    """Each sample's response token ids without padding (through its EOS when it has one)."""
    resp = roll.input_ids[:, roll.query_len :]
    return [row[m.bool()].tolist() for row, m in zip(resp, roll.response_mask, strict=True)]


# -- Scoring per response ----------------------------------------------------------------------
# Each response to the reward service as soon as it is finished, not when its chunk is.
#
# An engine that reports finished rows (``RolloutEngine.reports_finished``: hf, vllm_server) calls
# ``BatchScoring.on_finished`` as each response samples its stop token; the response is decoded and
# submitted at once, so a slow judge starts on the first short answers while the long ones still
# decode. What one submission holds is the service's ``unit``: one sample, a prompt's whole group
# (listwise, pairwise judges: sent when its last response is finished) or the chunk (reward models,
# judges packing samples per request: today's per-chunk submission). Responses cut at
# ``max_new_tokens`` are submitted when the chunk ends. Scores are collected in batch order, so
# failures keep their meaning (masked, counted, out of baselines, ``max_failure_rate`` per batch).


def score_meta(prompts: PromptSet, ids: list[int], resp_ids: list[list[int]], settings: RolloutSettings) -> ScoreMeta:
    """Labels, the templated prompts and full responses that full-text presets (llamafactory,
    openrlhf) send as those trainers do, and each prompt's image paths (so a judge sees what was asked)."""
    return ScoreMeta(
        labels=[prompts.labels[i] for i in ids],
        templated_prompts=None if prompts.templated is None else [prompts.templated[i] for i in ids],
        full_responses=None if settings.decode_full is None else settings.decode_full(
            [prompts.queries[i] for i in ids], resp_ids),
        images=None if prompts.images is None else [tuple(prompts.images[i]) for i in ids],
        criteria=None if prompts.criteria is None else [prompts.criteria[i] for i in ids],
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
    # A worker engine reports finished rows on its dispatcher thread while the trainer ends a chunk.
    _lock: threading.Lock = field(default_factory=threading.Lock)

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
        with self._lock:
            self._submit_locked(rows)

    def _submit_locked(self, rows: list[int]) -> None:
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
            one(meta.full_responses), one(meta.criteria))


def generate(engine: RolloutEngine, q_ids: torch.Tensor, q_mask: torch.Tensor, sampling: SamplingParams,
             pixels: PixelRows | None, on_finished: OnFinished | None = None) -> Rollout:
    """One chunk from the engine, with its rows' images when it has any; ``on_finished`` goes to
    engines that report finished rows (``RolloutEngine.reports_finished``)."""
    rows = pixels.select(range(q_ids.shape[0])) if pixels is not None else None
    if on_finished is not None and getattr(engine, "reports_finished", False):
        return engine.generate(q_ids, q_mask, sampling, pixels=rows, on_finished=on_finished)
    return engine.generate(q_ids, q_mask, sampling, pixels=rows)


@dataclass
class PendingExperience:
    """A sampled batch whose scores are still on their way (``finish_experience`` waits for them)."""

    futures: list  # scoring futures, one per submission (a sample, a group or a chunk)
    build: Callable[[ScoredBatch, float], Experience]  # (scores, seconds waited) -> the Experience
    policy_version: int
    rows: list[list[int]] | None = None  # the batch rows of each future (None: in order)
    producer_wait_s: float | None = None  # a worker process's idle time before sampling it (None: in-process)


def make_experience(ac: ActorCritic, engine: RolloutEngine, service: RewardService, settings: RolloutSettings,
                    prompts: PromptSet, idx: list[int], policy_version: int = 0) -> Experience:
    """Sample, score and run the no-grad passes over the prompts ``idx``, then wait for the scores."""
    return finish_experience(service, begin_experience(ac, engine, service, settings, prompts, idx, policy_version))


def finish_experience(service: RewardService, pending: PendingExperience) -> Experience:
    t0 = time.perf_counter()
    scored = service.collect(pending.futures, pending.rows)
    return pending.build(scored, time.perf_counter() - t0)


@dataclass
class Requested:
    """A batch whose chunks an engine that runs ahead (a rollout worker) is sampling meanwhile."""

    idx: list[int]  # (B,) each batch row's dataset row
    scoring: BatchScoring  # hears of each response as the worker finishes it
    tickets: list[int]  # one per chunk, in order
    policy_version: int  # the trainer's updates when requested: the worker samples with those weights


def batch_queries(ac: ActorCritic, settings: RolloutSettings, prompts: PromptSet, idx: list[int]
                  ) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(B,) rows, each prompt repeated ``num_generations`` times (a group contiguous), and the
    (B, Q) left-padded queries on the model's device."""
    device = next(ac.parameters()).device
    idx = [i for i in idx for _ in range(settings.num_generations)]
    q_ids, q_mask = pad_left([prompts.queries[i] for i in idx], settings.pad_token_id)
    return idx, q_ids.to(device), q_mask.to(device)


def request_rollouts(ac: ActorCritic, engine, service: RewardService, settings: RolloutSettings,
                     prompts: PromptSet, idx: list[int], policy_version: int) -> Requested:
    """Ask an engine that runs ahead (``HFWorkerEngine``) for the chunks of a batch and return at
    once; ``begin_experience(requested=...)`` takes the rollouts when the learner needs them."""
    idx, q_ids, q_mask = batch_queries(ac, settings, prompts, idx)
    rows, scoring = settings.chunk_size * settings.num_generations, BatchScoring(service, settings, prompts, idx)
    tickets = [engine.request(q_ids[c : c + rows], q_mask[c : c + rows], settings.sampling, scoring.on_finished(c))
               for c in range(0, len(idx), rows)]
    return Requested(idx, scoring, tickets, policy_version)


def sample_chunks(ac: ActorCritic, engine: RolloutEngine, settings: RolloutSettings, q_ids: torch.Tensor,
                  q_mask: torch.Tensor, chunk_pixels: list, scoring: BatchScoring) -> list[Rollout]:
    """Sample the batch chunk by chunk, each response handed to ``scoring`` as it is finished."""
    rows, rolls = settings.chunk_size * settings.num_generations, []
    with settings.gather():
        for c in range(0, q_ids.shape[0], rows):
            with ac.adapter_lock:  # a LoRA reward model on the same base switches adapters on its thread
                roll = generate(engine, q_ids[c : c + rows], q_mask[c : c + rows], settings.sampling,
                                chunk_pixels[c // rows], scoring.on_finished(c))
            scoring.end_chunk(c, response_rows(roll))
            rolls.append(roll)
    return rolls


def begin_experience(ac: ActorCritic, engine: RolloutEngine, service: RewardService, settings: RolloutSettings,
                     prompts: PromptSet, idx: list[int], policy_version: int = 0,
                     requested: Requested | None = None) -> PendingExperience:
    """Sample ``num_generations`` responses to each prompt of ``idx`` chunk by chunk (or take the
    ``requested`` ones from a worker), each response submitted for scoring as soon as it is finished
    (``BatchScoring``) and scored in the background while the rest samples and the forward passes
    run; the scores are collected later (``finish_experience``). A prompt's group never spans two
    ranks: each rank expands its own prompts."""
    device, t0 = next(ac.parameters()).device, time.perf_counter()
    if requested is None:
        idx, q_ids, q_mask = batch_queries(ac, settings, prompts, idx)
        rows = settings.chunk_size * settings.num_generations
        pixels = prompts.pixel_rows(idx, device)  # (B) rows' image inputs; None for a text batch
        chunk_pixels = [None if pixels is None else pixels.slice(c, c + rows) for c in range(0, len(idx), rows)]
        scoring = BatchScoring(service, settings, prompts, idx)
        rolls = sample_chunks(ac, engine, settings, q_ids, q_mask, chunk_pixels, scoring)
    else:
        scoring, policy_version, pixels = requested.scoring, requested.policy_version, None
        rolls = [engine.result(t, device) for t in requested.tickets]
        offsets = itertools.accumulate([0] + [r.input_ids.shape[0] for r in rolls[:-1]])
        for c, roll in zip(offsets, rolls, strict=True):
            scoring.end_chunk(c, response_rows(roll))
    return _pending(ac, engine, settings, rolls, scoring, pixels, policy_version, t0)


def _pending(ac: ActorCritic, engine: RolloutEngine, settings: RolloutSettings, rolls: list[Rollout],
             scoring: BatchScoring, pixels: PixelRows | None, policy_version: int, t0: float) -> PendingExperience:
    """The no-grad passes over the sampled chunks, gathered into (B, R) tensors (each padded to the
    longest response of the batch); the Experience is built once its scores are in."""
    idx, t_gen, device = scoring.idx, time.perf_counter() - t0, rolls[0].input_ids.device
    texts = [scoring.texts[r] for r in range(len(idx))]
    offsets = itertools.accumulate([0] + [r.input_ids.shape[0] for r in rolls[:-1]])
    chunk_pixels = [None if pixels is None else pixels.slice(c, c + r.input_ids.shape[0])
                    for c, r in zip(offsets, rolls, strict=True)]
    with ac.adapter_lock:
        stats = [response_stats(ac, roll, settings, p) for roll, p in zip(rolls, chunk_pixels, strict=True)]
    times = (t_gen, time.perf_counter() - t0)
    q, R = rolls[0].query_len, max(r.response_mask.shape[1] for r in rolls)
    logprobs, values, ref_logprobs, kl = (torch.cat([pad_right(s[i], R) for s in stats]) for i in range(4))
    sync = engine.check_sync(rolls, [s[0] for s in stats], settings.sampling)
    behaviour = None if any(r.logprobs is None for r in rolls) else torch.cat([pad_right(r.logprobs, R) for r in rolls])
    return PendingExperience(scoring.futures, lambda scored, t_wait: Experience(
        input_ids=torch.cat([pad_right(r.input_ids, q + R, settings.pad_token_id) for r in rolls]),
        attention_mask=torch.cat([pad_right(r.attention_mask, q + R) for r in rolls]),
        query_len=q,
        response_mask=torch.cat([pad_right(r.response_mask, R) for r in rolls]).float(),
        no_eos=torch.cat([r.no_eos for r in rolls]),
        logprobs=logprobs, ref_logprobs=ref_logprobs, kl=kl,
        values=values if ac.has_critic else None,
        group_ids=torch.tensor(idx, device=device),
        scores=torch.tensor(scored.values, device=device, dtype=torch.float32),
        valid=torch.tensor(scored.valid, device=device, dtype=torch.float32),
        texts=texts, pixels=pixels, policy_version=policy_version, behaviour_logprobs=behaviour,
        stats=RolloutStats({"time/generate": times[0], "time/rollout": times[1], "time/score_wait": t_wait},
                           scored.n_failed, scored.reasons, scored.metrics, sync, n_samples=len(idx),
                           score_details=scored.details),
    ), policy_version, scoring.rows, producer_wait_s=_worker_wait(rolls))


def _worker_wait(rolls: list[Rollout]) -> float | None:
    """Seconds a worker process sat idle before sampling these chunks (None: an in-process engine)."""
    waits = [r.producer_wait_s for r in rolls if r.producer_wait_s is not None]
    return sum(waits) if waits else None


def _pad_query(t: torch.Tensor, q: int, q_new: int, value: float) -> torch.Tensor:
    """(b, q + R) -> (b, q_new + R): more left padding before the query."""
    return torch.nn.functional.pad(t, (q_new - q, 0), value=value)


def select(exp: Experience, rows: list[int]) -> Experience:
    """The samples ``rows`` of ``exp`` (whole groups, in this order), padding kept."""
    i = torch.tensor(rows, dtype=torch.long, device=exp.input_ids.device)
    pick = lambda t: None if t is None else t[i]  # noqa: E731
    s = exp.stats
    return Experience(
        input_ids=exp.input_ids[i], attention_mask=exp.attention_mask[i], query_len=exp.query_len,
        response_mask=exp.response_mask[i], no_eos=exp.no_eos[i], logprobs=exp.logprobs[i],
        ref_logprobs=exp.ref_logprobs[i], values=pick(exp.values), kl=exp.kl[i], scores=exp.scores[i],
        valid=exp.valid[i], group_ids=exp.group_ids[i], texts=[exp.texts[r] for r in rows],
        stats=s.rows(rows),
        policy_version=exp.policy_version, behaviour_logprobs=pick(exp.behaviour_logprobs),
        pixels=None if exp.pixels is None else PixelRows([exp.pixels.pixel_values[r] for r in rows],
                                                         [exp.pixels.image_grid_thw[r] for r in rows]),
    )


def concat(exps: list[Experience], pad_token_id: int) -> Experience:
    """One Experience from several (same policy version), re-padded to the longest query and
    response; the stats of every round summed (``RolloutStats.merge``)."""
    q, R = max(e.query_len for e in exps), max(e.response_mask.shape[1] for e in exps)

    def seq(e: Experience, t: torch.Tensor, value: float) -> torch.Tensor:  # (b, Q+R) -> (b, q+R)
        return pad_right(_pad_query(t, e.query_len, q, value), q + R, value)

    def resp(name: str) -> torch.Tensor | None:
        parts = [getattr(e, name) for e in exps]
        return None if any(p is None for p in parts) else torch.cat([pad_right(p, R) for p in parts])

    stats = exps[0].stats
    for e in exps[1:]:
        stats = stats.merge(e.stats)
    pixels = [e.pixels for e in exps]
    return Experience(
        input_ids=torch.cat([seq(e, e.input_ids, pad_token_id) for e in exps]),
        attention_mask=torch.cat([seq(e, e.attention_mask, 0) for e in exps]), query_len=q,
        response_mask=resp("response_mask"), no_eos=torch.cat([e.no_eos for e in exps]), logprobs=resp("logprobs"),
        ref_logprobs=resp("ref_logprobs"), values=resp("values"), kl=resp("kl"),
        scores=torch.cat([e.scores for e in exps]), valid=torch.cat([e.valid for e in exps]),
        group_ids=torch.cat([e.group_ids for e in exps]), texts=[t for e in exps for t in e.texts], stats=stats,
        policy_version=exps[0].policy_version, behaviour_logprobs=resp("behaviour_logprobs"),
        pixels=None if all(p is None for p in pixels) else PixelRows(
            [v for e in exps for v in (e.pixels.pixel_values if e.pixels else [None] * len(e.texts))],
            [g for e in exps for g in (e.pixels.image_grid_thw if e.pixels else [None] * len(e.texts))]),
    )
