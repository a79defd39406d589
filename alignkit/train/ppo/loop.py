"""The RL loop on one base model with adapters, top to bottom: a producer and a learner.

The producer (``ExperienceSource``) makes one ``Experience`` a step: rollout, background scoring,
no-grad passes. The learner (``learn``) consumes it in TRL 0.11's ``PPOTrainer.step`` order:
shape → advantages (the configured estimator) → update (epochs × mini-batches, the configured
policy loss) → the engine's weight sync; then metrics, the KL controller and the checkpoint.
The math lives in ``alignkit.algos``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers.modeling_layers import GradientCheckpointingLayer

from alignkit.algos import AdaptiveKLController, FixedKLController, RunningMoments
from alignkit.algos.advantages import AdvantageParams
from alignkit.algos.correction import importance_weights
from alignkit.data.chat_format import ChatFormat
from alignkit.data.encode import encode_prompt
from alignkit.data.loader import Example
from alignkit.data.templates import get_template
from alignkit.generation import (
    ENGINES,
    EngineContext,
    RolloutEngine,
    SamplingParams,
    build_engine,
    stop_token_ids,
)
from alignkit.models.actor_critic import ActorCritic, build_actor_critic
from alignkit.models.loading import (
    build_policy_model,
    load_base,
    load_causal_lm,
    load_tokenizer,
    merge_adapters,
    model_dtype,
)
from alignkit.rewards.api.row_criteria import examples_criteria
from alignkit.rewards.service import RewardService, build_reward_service
from alignkit.train import checkpoint, sharding
from alignkit.train.checkpoint import resume
from alignkit.train.common import (
    build_optimizer,
    global_batch_indices,
    preflight,
    reduce_metrics,
    setup_run,
    total_steps,
)
from alignkit.train.ppo.credit import (
    FilterSettings,
    Shaped,
    ShapingSettings,
    advantages,
    apply_filters,
    shape,
)
from alignkit.train.ppo.experience import Experience, PromptSet, RolloutSettings
from alignkit.train.ppo.metrics import PLOTTED, MetricWindow, step_metrics
from alignkit.train.ppo.samples import SampleLogger
from alignkit.train.ppo.source import (
    DynamicSampling,
    ExperienceSource,
    PipelinedSource,
    any_rank,
    rank_indices,
)
from alignkit.train.ppo.update import Learner, UpdateSettings, policy_logprobs, update
from alignkit.train.ppo_config import PPOConfig
from alignkit.train.tracking import MetricLogger, plot_metrics

logger = logging.getLogger(__name__)


@dataclass
class PPORun:
    """Everything one run holds, built once by ``prepare``."""

    cfg: PPOConfig
    out: Path
    prompts: PromptSet
    ac: ActorCritic
    engine: RolloutEngine
    service: RewardService
    source: ExperienceSource  # the producer
    learner: Learner
    scheduler: torch.optim.lr_scheduler.LRScheduler
    kl_ctl: FixedKLController
    moments: RunningMoments | None
    num_steps: int

    @property
    def accelerator(self) -> Accelerator:
        return self.learner.accelerator


def run(cfg: PPOConfig, engine: RolloutEngine | None = None) -> Path:
    """Train; returns the output dir. ``engine`` replaces the default ``hf`` rollout engine."""
    examples = preflight(cfg, "prompt")  # paths and data checked before anything is written or loaded
    accelerator, out = setup_run(cfg)
    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code)
    prompts = load_prompts(cfg, tokenizer, examples)
    ac = build_models(cfg).to(accelerator.device)
    service = build_reward_service(cfg, cfg.reward_context(), policy_model=ac)
    own_engine = engine is None  # an engine passed in belongs to the caller, who closes it
    try:  # closed on every exit, errors included: judge session, cache, scoring thread, engine
        service.start()
        engine = engine or build_engine(cfg.rollout, ac, engine_context(cfg, tokenizer.pad_token_id))
        r = prepare(cfg, accelerator, out, prompts, ac, service, tokenizer, engine)
        train(r)
        with sharding.full_weights(accelerator, r.learner.model):  # ZeRO-3, FSDP: the trained weights, whole
            if accelerator.is_main_process:  # 9. Final save: policy (adapter or full) + value head + tokenizer
                ac.save_policy(out)
                tokenizer.save_pretrained(out)
        if accelerator.is_main_process and cfg.plot_loss:
            plot_metrics(out, PLOTTED)
    finally:
        service.close()
        if own_engine and engine is not None:
            engine.close()
    if summary := service.failure_summary():
        logger.warning("reward failures over the run: %s", summary)
    accelerator.wait_for_everyone()
    return out


def train(r: PPORun) -> None:
    cfg, acc = r.cfg, r.accelerator
    # 1. Resume: weights, value head, optimizer, scheduler, KL controller, score moments, RNG.
    state = resume(acc, r.out, cfg, r.ac.load_trainable, r.learner.optimizer, r.scheduler, r.learner.model)
    start = state["step"] if state else 0
    if state:
        r.kl_ctl.load_state_dict(state["kl_ctl"])
        if r.moments is not None:
            r.moments.load_state_dict(state["moments"])
    tracker = MetricLogger(r.out, cfg.report_to, enabled=acc.is_main_process, resume_step=start,
                           total_steps=r.num_steps)
    samples = SampleLogger.for_run(cfg, r.out, r.prompts.texts, r.service, r.num_steps, acc.is_main_process, start,
                                   labels=r.prompts.labels)
    window = MetricWindow()  # the steps since the last logged row: counters summed, gauges averaged
    bar = tqdm(total=r.num_steps, initial=start, desc="ppo", disable=not acc.is_main_process, dynamic_ncols=True)
    for step in range(start, r.num_steps):
        t_step, cpu_step = time.perf_counter(), time.process_time()
        # 2. Producer: this rank's share of the step's prompts, sampled by the policy after `step`
        # updates (zero lag); scoring overlaps sampling and the no-grad forward passes.
        exp = r.source.experience(step, policy_version=step)
        if exp.stats.sync is not None and not exp.stats.sync.ok:  # an engine sampling stale weights
            raise RuntimeError(exp.stats.sync.error())
        if step - exp.policy_version > cfg.async_level:  # the staleness bound, by construction of the source
            raise RuntimeError(f"step {step} got a batch sampled at version {exp.policy_version} (async_level "
                               f"{cfg.async_level}): the experience source broke its staleness bound")
        # 3.-5. Learner: shape, filter, advantages, PPO epochs, weight sync.
        shaped, adv, returns, stats = learn(r, exp, policy_version=step)
        # 6. Metrics (reduced over ranks), KL controller, progress, checkpoint.
        metrics = reduce_metrics(acc, {**step_metrics(exp, shaped, adv, returns), **stats})
        metrics.update(run_metrics(r, exp, time.perf_counter() - t_step))
        # CPU seconds of all the process's threads: what the step cost, whatever else shares the machine.
        metrics["time/step_cpu"] = time.process_time() - cpu_step
        metrics.update(samples(step + 1, exp, shaped, tracker))  # samples.jsonl on schedule, the reward probe
        r.kl_ctl.update(metrics["objective/kl"], cfg.rollout_batch_size * acc.num_processes * cfg.num_generations)
        window.add(metrics)
        done = step + 1
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['env/reward_mean']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
        if done % cfg.logging_steps == 0 or done == r.num_steps:
            tracker.log(done, window.flush())
        if done % cfg.save_steps == 0 and done < r.num_steps:
            save(r, done)
        acc.wait_for_everyone()
    bar.close()
    tracker.close()


def learn(r: PPORun, exp: Experience, policy_version: int) -> tuple[Shaped, torch.Tensor, torch.Tensor, dict]:
    """The learner's step on one Experience: ``(shaped, advantages, returns, update and filter stats)``.
    Shape rewards (KL penalty per token unless the KL is a loss term, score at the last token),
    filter what stays out of the loss, advantages from the configured estimator, then the PPO
    epochs over mini-batches (skipped on every rank when no score is valid), the scheduler and
    the engine's weight sync: the next Experience is sampled by the updated policy."""
    cfg, t0 = r.cfg, time.perf_counter()
    correction = correct_off_policy(r, exp, policy_version)
    shaped = shape(exp, shaping_settings(cfg), 0.0 if cfg.use_kl_loss else r.kl_ctl.value, r.moments)
    filtered = apply_filters(exp, shaped, FilterSettings(cfg.num_generations > 1, cfg.filter_zero_std_groups,
                                                         cfg.mask_truncated_completions))
    adv, returns = advantages(exp, shaped, cfg.advantage_estimator,
                              AdvantageParams(cfg.gamma, cfg.lam, cfg.whiten_advantages))
    with r.ac.adapter_lock:
        stats = update(r.learner, update_settings(cfg, r.kl_ctl.value), exp, adv, returns) \
            if r.accelerator.reduce(exp.mask.sum(), "sum") > 0 else {}
    r.scheduler.step()
    r.engine.sync_weights(r.ac)
    exp.stats.timing["time/update"] = time.perf_counter() - t0
    return shaped, adv, returns, {**filtered, **stats, **correction}


def correct_off_policy(r: PPORun, exp: Experience, policy_version: int) -> dict[str, float]:
    """Importance weights for a batch the learner's policy did not sample itself: stale (async) or
    with an engine's own log-probs. The ratio is then taken against the current (proximal) policy
    and each token weighted by pi_prox / pi_behaviour (algos.correction). An on-policy batch of an
    engine without log-probs (hf, async_level 0) is left alone: its weight is exactly 1."""
    cfg = r.cfg
    stale = exp.policy_version < policy_version
    if cfg.is_correction == "none" or not (stale or exp.behaviour_logprobs is not None):
        return {}
    behaviour = exp.behaviour_logprobs if exp.behaviour_logprobs is not None else exp.logprobs
    if stale and exp.logprobs_version != policy_version:
        # The sampling policy's log-probs stay the behaviour; the current policy's are the ratio's base.
        with r.ac.adapter_lock:
            exp.logprobs = policy_logprobs(r.learner, exp, cfg.temperature, cfg.per_device_eval_batch_size)
    exp.is_weights, exp.is_mask, stats = importance_weights(exp.logprobs, behaviour, exp.response_mask,
                                                            cfg.is_correction, cfg.is_cap, cfg.is_mask_low,
                                                            cfg.is_level)
    return {**stats, "async/staleness": float(policy_version - exp.policy_version),
            "async/staleness_max": float(policy_version - exp.policy_version)}


def run_metrics(r: PPORun, exp, t_step: float) -> dict[str, float]:
    """Reward counters (this rank), failures, samples and tokens (all ranks), KL coefficient, LR,
    timings, dynamic-sampling rounds and the engine's sync check."""
    acc, st = r.accelerator, exp.stats
    n_tokens = acc.reduce(exp.response_mask.sum(), "sum").item()
    counts = acc.reduce(torch.tensor([float(st.n_failed), float(st.n_samples)], device=acc.device), "sum")
    out = {**st.reward_metrics, **st.timing, "reward/failures": counts[0].item(), "rollout/samples": counts[1].item(),
           "objective/kl_coef": r.kl_ctl.value, "ppo/learning_rate": r.scheduler.get_last_lr()[0],
           "time/step": t_step, "perf/tokens_per_s": n_tokens / t_step}
    if r.cfg.dynamic_sampling:
        out["rollout/sampling_rounds"] = float(st.rounds)
    if st.sync is not None:
        out["rollout/engine_logprob_diff"] = st.sync.logprob_diff
    return out


def engine_context(cfg: PPOConfig, pad_token_id: int) -> EngineContext:
    return EngineContext(cfg.model_name_or_path, pad_token_id, "bfloat16" if cfg.bf16 else "float16" if cfg.fp16
                         else "float32", cfg.cutoff_len, cfg.seed, tuple(cfg.adapter_name_or_path or []),
                         str(cfg.output_dir))


def save(r: PPORun, done: int) -> None:
    """A checkpoint (every rank calls it): policy files, optimizer (or ZeRO shards), scheduler, KL
    controller, score moments and every rank's RNG."""
    checkpoint.save_checkpoint(r.accelerator, r.learner.model, r.learner.optimizer, r.out, done, r.ac.save_policy, {
        "scheduler": r.scheduler.state_dict(), "kl_ctl": r.kl_ctl.state_dict(),
        "moments": r.moments.state_dict() if r.moments else None,
    }, r.cfg.save_total_limit)


def load_prompts(cfg: PPOConfig, tokenizer, examples: list[Example]) -> PromptSet:
    """Template-encoded prompts (room left for max_new_tokens), the prompt text the reward sees and,
    on a VL model, each prompt's images."""
    fmt = ChatFormat.for_model(cfg, tokenizer)  # its vision processor is None on a text-only model
    prompt_len = max(8, cfg.cutoff_len - cfg.max_new_tokens)
    queries = [encode_prompt(fmt, ex, prompt_len) for ex in examples]
    return PromptSet(
        queries=queries,
        texts=[ex.last_user_text() for ex in examples],
        labels=[ex.label for ex in examples],
        templated=RewardService.full_texts(tokenizer, queries),
        images=[ex.images for ex in examples] if any(ex.images for ex in examples) else None,
        vision=fmt.vision,
        criteria=examples_criteria(cfg, examples),
    )


def build_models(cfg: PPOConfig) -> ActorCritic:
    """One base in memory for LoRA: every SFT adapter merged, so "adapter off" is the SFT reference
    and the new policy adapter starts from it. Full fine-tuning (or a ``ref_model``) keeps a frozen
    reference copy."""
    if cfg.ref_model:  # LLaMA-Factory's separate reference model, with its own adapters
        ref = merge_adapters(load_causal_lm(cfg.ref_model, model_dtype(cfg.bf16, cfg.fp16), cfg.trust_remote_code),
                             cfg.ref_model_adapters or [])
    else:
        ref = load_base(cfg) if cfg.finetuning_type == "full" else None
    ac = build_actor_critic(build_policy_model(cfg, merge_all=True), cfg, ref_lm=ref)
    # Dropout off during rollout *and* update: with dropout, the log-probs of the update would
    # not be those of the policy that sampled (Huang et al. 2023).
    ac.eval()
    if cfg.gradient_checkpointing:  # transformers checkpoints a layer only in training mode: set
        # that flag on the checkpointed layers alone (dropout modules stay in eval). Measured on
        # SmolLM2 GRPO: peak RSS 1954 MiB instead of 3105.
        for m in ac.modules():
            if isinstance(m, GradientCheckpointingLayer):
                m.training = True
    return ac


def prepare(cfg: PPOConfig, accelerator: Accelerator, out: Path, prompts: PromptSet, ac: ActorCritic,
            service: RewardService, tokenizer, engine: RolloutEngine) -> PPORun:
    """Sizes, optimizer, scheduler, KL controller, score moments and the experience source."""
    global_bs = cfg.rollout_batch_size * accelerator.num_processes
    if len(prompts.queries) < global_bs:
        raise ValueError(f"{len(prompts.queries)} prompts cannot fill one rollout batch of {global_bs} "
                         "(per_device_train_batch_size x gradient_accumulation_steps x ppo_buffer_size x ranks)")
    spec = ENGINES.get(cfg.rollout.engine)
    if prompts.images is not None and spec is not None and not spec.accepts_images:
        raise ValueError(f"the prompts have images, but the {cfg.rollout.engine} rollout engine takes text only; "
                         "set rollout.engine: hf for image prompts.")
    num_steps = total_steps(cfg, len(prompts.queries) // global_bs)
    sharding.check_supported(accelerator, lora_reward=cfg.reward_model_type == "lora",
                             vllm=spec is not None and spec.needs_whole_weights)
    if getattr(cfg.rollout, "worker", "none") == "process" and sharding.backend(accelerator) in ("zero3", "fsdp"):
        raise NotImplementedError(
            f"rollout.worker: process copies the policy into its own process and sends its weights after each "
            f"update, but a {sharding.backend(accelerator)} sharded policy is whole on no rank; use rollout.worker: "
            "none (alignkit gathers the policy once per rollout) or train under ZeRO-2 or DDP.")
    sharding.shard(accelerator, ac)  # FSDP: before the optimizer, which must hold the shards
    params = ac.trainable_parameters()
    optimizer, scheduler = build_optimizer(cfg, params, num_steps)
    # update() backs up micro-batches of per_device_train_batch_size prompts with their groups and
    # steps once per gradient_accumulation_steps of them (DeepSpeed's boundary: sharding.backward).
    sharding.configure(accelerator, cfg.per_device_train_batch_size * cfg.num_generations,
                       cfg.gradient_accumulation_steps, cfg.max_grad_norm)
    model, optimizer = sharding.prepare(accelerator, ac, optimizer)
    rollout = rollout_settings(cfg, tokenizer, service, ac,
                               partial(sharding.rollout_context, accelerator, model, ac.lm))
    kl_ctl = (AdaptiveKLController(cfg.init_kl_coef, cfg.ppo_target, cfg.kl_horizon) if cfg.adap_kl_ctrl
              else FixedKLController(cfg.init_kl_coef))
    source = experience_source(cfg, accelerator, rollout, prompts, ac, engine, service, num_steps)
    return PPORun(cfg, out, prompts, ac, engine, service, source,
                  Learner(accelerator, model, optimizer, params), scheduler, kl_ctl,
                  RunningMoments() if cfg.ppo_score_norm else None, num_steps)


def rollout_settings(cfg: PPOConfig, tokenizer, service: RewardService, ac: ActorCritic, gather) -> RolloutSettings:
    template = get_template(cfg.template, tokenizer)
    sampling = SamplingParams(cfg.max_new_tokens, tuple(stop_token_ids(tokenizer, template, ac.lm)),
                              cfg.temperature, cfg.top_k, cfg.top_p)
    return RolloutSettings(
        sampling=sampling, num_generations=cfg.num_generations,
        # One chunk by default: every extra chunk is another full decode loop. The forward passes of
        # the whole batch already cover a ~100 ms judge; smaller chunks help only slower judges.
        chunk_size=cfg.rollout_chunk_size or cfg.rollout_batch_size,
        forward_batch_size=cfg.per_device_eval_batch_size, kl_estimator=cfg.kl_penalty,
        pad_token_id=tokenizer.pad_token_id,
        decode=partial(service.response_texts, tokenizer),
        decode_full=partial(service.joint_responses, tokenizer),
        # A KL coefficient of 0 stays 0 (the adaptive controller scales it): no reference pass at all.
        need_reference=cfg.init_kl_coef > 0,
        gather=gather,
    )


def experience_source(cfg: PPOConfig, accelerator: Accelerator, rollout: RolloutSettings, prompts: PromptSet,
                      ac: ActorCritic, engine: RolloutEngine, service: RewardService, num_steps: int
                      ) -> ExperienceSource:
    """The producer: one rank's share of each step's prompts, DAPO's dynamic sampling, or batches
    sampled up to async_level versions ahead."""
    indices = rank_indices(len(prompts.queries), cfg.rollout_batch_size * accelerator.num_processes, cfg.seed,
                           accelerator.process_index, accelerator.num_processes, global_batch_indices)
    if cfg.dynamic_sampling:
        return DynamicSampling(ac, engine, service, rollout, prompts, indices, n_prompts=cfg.rollout_batch_size,
                               max_rounds=cfg.max_sampling_rounds, agree=any_rank(accelerator))
    if cfg.async_level:
        return PipelinedSource(ac, engine, service, rollout, prompts, indices, async_level=cfg.async_level,
                               num_steps=num_steps)
    return ExperienceSource(ac, engine, service, rollout, prompts, indices)


def update_settings(cfg: PPOConfig, kl_coef: float) -> UpdateSettings:
    # per_device_train_batch_size counts prompts: a micro-batch holds their whole groups, so a
    # rollout batch is ppo_buffer_size mini-batches whatever num_generations is.
    micro = cfg.per_device_train_batch_size * cfg.num_generations
    return UpdateSettings(
        ppo_epochs=cfg.ppo_epochs, mini_batch_size=micro * cfg.gradient_accumulation_steps, micro_batch_size=micro,
        temperature=cfg.temperature, policy_loss=cfg.policy_loss, cliprange_low=cfg.clip_range[0],
        cliprange_high=cfg.clip_range[1], cliprange_value=cfg.cliprange_value, vf_coef=cfg.vf_coef,
        ent_coef=cfg.ent_coef, max_grad_norm=cfg.max_grad_norm, loss_agg_mode=cfg.loss_agg_mode,
        max_len=cfg.max_new_tokens, kl_loss_coef=kl_coef if cfg.use_kl_loss else 0.0,
        kl_loss_estimator=cfg.kl_estimator,
    )


def shaping_settings(cfg: PPOConfig) -> ShapingSettings:
    overlong = (cfg.max_new_tokens, cfg.overlong_buffer_len, cfg.overlong_penalty_factor) \
        if cfg.overlong_buffer_len else None
    repetition = (cfg.score_repetition_ngram, cfg.score_repetition_threshold, cfg.score_repetition_penalty) \
        if cfg.score_repetition_penalty else None
    return ShapingSettings(cfg.missing_eos_penalty, cfg.score_clip, cfg.ppo_whiten_rewards, overlong, repetition)
