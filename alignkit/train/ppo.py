"""PPO with a value head on one base model with adapters.

One step, top to bottom: prompts → rollout (chunks, scoring starts per chunk) → old/ref
forward passes → wait for scores → shape rewards → GAE → ppo_epochs × mini-batches → log,
KL controller, checkpoint. The math lives in ``alignkit.algos``; this file only wires it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from alignkit.algos import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    compute_gae,
    entropy_from_logits,
    explained_variance,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    policy_loss,
    postprocess_scores,
    shape_rewards,
    value_loss,
)
from alignkit.data.collators import pad_left
from alignkit.data.encode import encode_prompt
from alignkit.data.loader import load_examples
from alignkit.data.templates import get_template
from alignkit.models.actor_critic import ActorCritic, build_actor_critic
from alignkit.models.loading import load_causal_lm, load_tokenizer, merge_adapters, model_dtype
from alignkit.rewards.api import apply_failure_policy
from alignkit.rewards.base import ScoreMeta
from alignkit.rewards.factory import build_reward_source
from alignkit.rewards.runner import BackgroundScorer
from alignkit.rewards.text import DEFAULT_THINK_TAGS, think_truncated_frac
from alignkit.train.checkpoint import save_checkpoint
from alignkit.train.common import (
    build_optimizer,
    global_batch_indices,
    rank_rng_states,
    reduce_metrics,
    resume,
    setup_run,
    total_steps,
)
from alignkit.train.ppo_config import PPOConfig
from alignkit.generation import decode_responses, sample, stop_token_ids
from alignkit.train.tracking import MetricLogger, plot_metrics

logger = logging.getLogger(__name__)
PLOTTED = ["env/reward_mean", "objective/kl", "objective/kl_coef", "ppo/loss/policy", "ppo/loss/value",
           "ppo/loss/total", "rollout/response_len_mean"]
UPDATE_STATS = ("ppo/loss/policy", "ppo/loss/value", "ppo/loss/total", "ppo/policy/approxkl", "ppo/policy/clipfrac",
                "ppo/val/clipfrac", "ppo/policy/entropy", "ppo/val/explained_variance")


def build_models(cfg: PPOConfig, tokenizer) -> ActorCritic:
    """One base in memory for LoRA (SFT adapters merged, so 'adapter off' is the SFT reference)."""
    dtype = model_dtype(cfg.bf16, cfg.fp16)
    base = merge_adapters(load_causal_lm(cfg.model_name_or_path, dtype, cfg.trust_remote_code),
                          list(cfg.adapter_name_or_path or []))
    ref = None
    if cfg.finetuning_type == "full":
        ref = merge_adapters(load_causal_lm(cfg.model_name_or_path, dtype, cfg.trust_remote_code),
                             list(cfg.adapter_name_or_path or []))
    if cfg.gradient_checkpointing:
        from alignkit.models.loading import enable_gradient_checkpointing

        enable_gradient_checkpointing(base)
    ac = build_actor_critic(base, cfg, ref_lm=ref)
    # Dropout off during rollout *and* update: with dropout, the log-probs of the update would
    # not be those of the policy that sampled (Huang et al. 2023).
    ac.eval()
    return ac


def response_stats(ac: ActorCritic, input_ids, attention_mask, q: int, temperature: float, kl_kind: str):
    """Old log-probs, values and reference log-probs of the response tokens, (B, R) each, and KL."""
    logits, values = ac(input_ids, attention_mask, q)  # (B, R, V), (B, R)
    tokens = input_ids[:, q:]
    ref_logits = ac.reference_logits(input_ids, attention_mask, q)
    logp = logprobs_from_logits(logits, tokens, temperature)
    ref_logp = logprobs_from_logits(ref_logits, tokens, temperature)
    full = kl_kind == "full"
    kl = kl_penalty(logp, ref_logp, kl_kind, logits if full else None, ref_logits if full else None, temperature)
    return logp, values.float(), ref_logp, kl


def pad_right(t: torch.Tensor, length: int, value: float = 0) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)


def run(cfg: PPOConfig) -> Path:
    # 1. Setup: accelerator, output dir, tokenizer, template, prompts, models, reward source.
    accelerator, out = setup_run(cfg)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code)
    template = get_template(cfg.template, tokenizer)
    examples = load_examples(cfg.dataset, cfg.dataset_dir, "prompt", cfg.max_samples, cfg.skip_bad_rows)
    prompt_len = max(8, cfg.cutoff_len - cfg.max_new_tokens)
    queries = [encode_prompt(tokenizer, template, ex, prompt_len, cfg.default_system, cfg.enable_thinking)
               for ex in examples]
    prompt_texts = [next((m["content"] for m in reversed(ex.messages) if m["role"] == "user"), "") for ex in examples]
    ac = build_models(cfg, tokenizer)
    ac.to(device)
    source = build_reward_source(cfg, ac)
    scorer = BackgroundScorer(source)
    # Closed on every exit, errors included: the judge session, the cache and the scoring thread.
    try:
        if cfg.reward_model_type == "api" and (cfg.reward_api or {}).get("health_check", True):
            scorer.run(source.health_check())
        eos_ids = stop_token_ids(tokenizer, template, ac.lm)
        skip_special = not (cfg.reward_api or {}).get("include_special_tokens", False)
        # The judge's own failure policy when scoring over HTTP; the stage's for rules and models.
        api = cfg.reward_api or {}
        on_failure = api.get("on_failure", cfg.on_failure) if cfg.reward_model_type == "api" else cfg.on_failure
        max_failure_rate = api.get("max_failure_rate", cfg.max_failure_rate) if cfg.reward_model_type == "api" else cfg.max_failure_rate

        # 2. Sizes: rollout batch = per_device x accum x buffer prompts per rank; mini-batch = per_device x accum.
        rollout_bs, mb, micro = cfg.rollout_batch_size, cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps, cfg.per_device_train_batch_size
        # One chunk by default: every extra chunk is another full decode loop. The forward passes of
        # the whole batch already cover a ~100 ms judge; smaller chunks help only slower judges.
        chunk = cfg.rollout_chunk_size or rollout_bs
        fwd_bs = cfg.per_device_eval_batch_size
        global_bs = rollout_bs * world
        if len(queries) < global_bs:
            raise ValueError(f"{len(queries)} prompts cannot fill one rollout batch of {global_bs}")
        num_steps = total_steps(cfg, len(queries) // global_bs)
        params = ac.trainable_parameters()
        optimizer, scheduler = build_optimizer(cfg, params, num_steps)
        model, optimizer = accelerator.prepare(ac, optimizer)
        kl_ctl = (AdaptiveKLController(cfg.init_kl_coef, cfg.ppo_target, cfg.kl_horizon) if cfg.adap_kl_ctrl
                  else FixedKLController(cfg.init_kl_coef))
        moments = RunningMoments() if cfg.ppo_score_norm else None

        # 3. Resume: adapter/weights, value head, optimizer, scheduler, KL controller, score moments, RNG.
        state = resume(accelerator, out, cfg, ac.load_trainable, optimizer, scheduler)
        start = state["step"] if state else 0
        if state:
            kl_ctl.load_state_dict(state["kl_ctl"])
            if moments is not None:
                moments.load_state_dict(state["moments"])

        tracker = MetricLogger(out, cfg.report_to, enabled=accelerator.is_main_process, resume_step=start)
        bar = tqdm(total=num_steps, initial=start, desc="ppo", disable=not accelerator.is_main_process, dynamic_ncols=True)
        for step in range(start, num_steps):
            t_step = time.perf_counter()
            idx = global_batch_indices(len(queries), step, global_bs, cfg.seed)[rank::world]
            if debug_path := os.environ.get("ALIGNKIT_DEBUG_ROLLOUTS"):  # tests check each rank's share
                with open(debug_path, "a") as f:
                    f.write(json.dumps({"step": step, "rank": rank, "indices": idx}) + "\n")
            q_ids, q_mask = pad_left([queries[i] for i in idx], tokenizer.pad_token_id)
            q_ids, q_mask = q_ids.to(device), q_mask.to(device)
            q = q_ids.shape[1]

            # 4. Rollout chunk by chunk (one chunk unless rollout_chunk_size is set). Each chunk's
            # scoring starts at once on the background loop, overlapping later chunks' sampling and
            # all the forward passes below, so judge latency hides behind compute.
            t0 = time.perf_counter()
            futures, rolls, all_texts = [], [], []
            for c in range(0, rollout_bs, chunk):
                with ac.adapter_lock:
                    roll = sample(ac.lm, tokenizer.pad_token_id, q_ids[c : c + chunk], q_mask[c : c + chunk], cfg.max_new_tokens,
                                  cfg.temperature, cfg.top_k, cfg.top_p, eos_ids)
                texts = decode_responses(tokenizer, roll, skip_special)
                all_texts += texts
                ids = idx[c : c + chunk]
                futures.append(scorer.submit([prompt_texts[i] for i in ids], texts,
                                             ScoreMeta(labels=[examples[i].label for i in ids])))
                rolls.append(roll)
            t_gen = time.perf_counter() - t0
            # Old log-probs, values, reference log-probs and KL, per_device_eval_batch_size rows at a time.
            chunks = []
            for roll in rolls:
                with torch.no_grad(), ac.adapter_lock:
                    parts = [response_stats(ac, roll.input_ids[m : m + fwd_bs], roll.attention_mask[m : m + fwd_bs], q,
                                            cfg.temperature, cfg.kl_penalty)
                             for m in range(0, roll.input_ids.shape[0], fwd_bs)]
                chunks.append((roll, *(torch.cat(p) for p in zip(*parts, strict=True))))
            t_rollout = time.perf_counter() - t0

            # 5. Gather chunks into (B, R) tensors; wait for what scoring has not finished.
            R = max(r.response_mask.shape[1] for r, *_ in chunks)
            b_input_ids = torch.cat([pad_right(r.input_ids, q + R, tokenizer.pad_token_id) for r, *_ in chunks])
            b_attn = torch.cat([pad_right(r.attention_mask, q + R) for r, *_ in chunks])
            b_resp_mask = torch.cat([pad_right(r.response_mask, R) for r, *_ in chunks]).float()
            b_no_eos = torch.cat([r.no_eos for r, *_ in chunks])
            b_logprobs, b_values, b_ref_logprobs, b_kl = (torch.cat([pad_right(c[i], R) for c in chunks]) for i in (1, 2, 3, 4))
            t0 = time.perf_counter()
            scores = [s for f in futures for s in f.result()]
            t_wait = time.perf_counter() - t0
            values, valid, n_failed = apply_failure_policy(scores, on_failure, max_failure_rate)
            b_valid = torch.tensor(valid, device=device, dtype=torch.float32)  # (B,)
            b_scores = torch.tensor(values, device=device, dtype=torch.float32)

            # 6. Shape rewards (KL penalty per token, score at the last token) and compute advantages.
            t_upd = time.perf_counter()
            b_scores_pp = b_scores.clone()
            if b_valid.any():
                ok = b_valid.bool()
                b_scores_pp[ok] = postprocess_scores(b_scores[ok], b_no_eos[ok], cfg.missing_eos_penalty, cfg.score_clip, moments)
            b_scores_pp = b_scores_pp * b_valid
            b_mask = b_resp_mask * b_valid[:, None]  # failed samples are masked out of the update
            # The KL estimate was computed per chunk so 'full' never keeps (B, R, V) logits around.
            rewards, non_score = shape_rewards(b_scores_pp, b_kl, b_resp_mask, kl_ctl.value)
            if cfg.ppo_whiten_rewards:
                rewards = masked_whiten(rewards, b_mask, shift_mean=False)
            advantages, returns = compute_gae(rewards, b_values, b_mask, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages and b_mask.sum() > 1:
                advantages = masked_whiten(advantages, b_mask)

            # 7. PPO epochs over shuffled mini-batches, accumulating micro-batches per optimizer step.
            with ac.adapter_lock:
                stats = update(cfg, accelerator, model, ac, optimizer, params, b_input_ids, b_attn, b_mask, b_logprobs,
                           b_values, advantages, returns, q, mb, micro) if accelerator.reduce(b_mask.sum(), "sum") > 0 else {}
            scheduler.step()
            t_update = time.perf_counter() - t_upd

            # 8. Metrics (reduced over ranks), KL controller, progress, checkpoint.
            local = {**rollout_metrics(b_scores, b_scores_pp, b_valid, b_kl, b_mask, b_resp_mask, b_logprobs, b_values,
                                       b_no_eos, non_score, returns, advantages), **stats}
            if api.get("strip_think"):  # thinking models: share of responses cut off inside <think>
                local["rollout/think_truncated_frac"] = think_truncated_frac(all_texts, api.get("think_tags") or DEFAULT_THINK_TAGS)
            metrics = reduce_metrics(accelerator, local)
            n_tokens = accelerator.reduce(b_resp_mask.sum(), "sum").item()
            metrics.update(source.metrics())  # latency percentiles, cache hits (this rank's)
            metrics.update({
                "objective/kl_coef": kl_ctl.value,
                "ppo/learning_rate": scheduler.get_last_lr()[0],
                "reward/failures": accelerator.reduce(torch.tensor(float(n_failed), device=device), "sum").item(),
                "time/rollout": t_rollout, "time/generate": t_gen, "time/score_wait": t_wait, "time/update": t_update,
                "time/step": time.perf_counter() - t_step,
            })
            metrics["perf/tokens_per_s"] = n_tokens / metrics["time/step"]
            kl_ctl.update(metrics["objective/kl"], global_bs)
            done = step + 1
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['env/reward_mean']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
            if done % cfg.logging_steps == 0 or done == num_steps:
                tracker.log(done, metrics)
            if done % cfg.save_steps == 0 and done < num_steps:
                rngs = rank_rng_states(accelerator)  # collective; each rank resumes its own sampling stream
                if accelerator.is_main_process:
                    save_checkpoint(out, done, lambda d: ac.save_policy(d), {
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "kl_ctl": kl_ctl.state_dict(), "moments": moments.state_dict() if moments else None,
                        "rng_per_rank": rngs,
                    }, cfg.save_total_limit)
            accelerator.wait_for_everyone()
        bar.close()

        # 9. Final save: policy adapter (or full model) + value head + tokenizer; plots; summary.
        if accelerator.is_main_process:
            ac.save_policy(out)
            tokenizer.save_pretrained(out)
            if cfg.plot_loss:
                plot_metrics(out, PLOTTED)
    finally:
        scorer.close()
    summary = getattr(source, "failure_summary", lambda: {})()
    if summary:
        logger.warning("reward failures over the run: %s", summary)
    tracker.close()
    if accelerator.is_main_process:
        try:
            from alignkit.report import write_report

            logger.info("training report: %s", write_report(out))
        except Exception as err:  # a plotting problem must not fail a finished run
            logger.warning("could not write the training report: %s", err)
    accelerator.wait_for_everyone()
    return out


def trim_padding(attn: torch.Tensor, q: int) -> tuple[slice, slice]:
    """Column slices that drop the padding a micro-batch's rows all share: left padding of the
    query and right padding of the response. Returns (slice of the (b, Q+R) sequence, slice of
    the (b, R) response tensors); rollout batches are padded to their longest row, and a random
    micro-batch of a few rows rarely needs all of it."""
    real = attn.any(0)  # (Q+R,)
    first = min(int(real[:q].long().argmax()) if real[:q].any() else q - 1, q - 1)
    last = max(int(real.nonzero().max()), q)  # keep at least one response column
    return slice(first, last + 1), slice(0, last + 1 - q)


def update(cfg, accelerator, model, ac, optimizer, params, b_input_ids, b_attn, b_mask, b_logprobs, b_values,
           advantages, returns, q, mb, micro) -> dict[str, float]:
    """``ppo_epochs`` passes over shuffled mini-batches; one optimizer step per mini-batch."""
    B = b_input_ids.shape[0]
    sums: dict[str, float] = {}
    n = 0
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(B)
        for s in range(0, B, mb):
            mb_idx = perm[s : s + mb]
            mb_tokens = b_mask[mb_idx].sum().clamp(min=1)
            for m in range(0, len(mb_idx), micro):
                i = mb_idx[m : m + micro]
                mask = b_mask[i]
                # Under DDP each backward all-reduces, so every rank runs the same number of them:
                # an all-masked micro-batch (failed scores) still runs there, with a zero loss.
                empty = bool(mask.sum() == 0)
                if empty and accelerator.num_processes == 1:
                    continue
                cols, rows = trim_padding(b_attn[i], q)
                ids, qi, mask = b_input_ids[i][:, cols], q - cols.start, mask[:, rows]
                logits, vpred = model(ids, b_attn[i][:, cols], qi)
                logp = logprobs_from_logits(logits, ids[:, qi:], cfg.temperature)
                vpred = vpred.float()
                pg_loss, pg_stats = policy_loss(logp, b_logprobs[i][:, rows], advantages[i][:, rows], mask, cfg.cliprange)
                vf_loss, vf_stats = value_loss(vpred, b_values[i][:, rows], returns[i][:, rows], mask,
                                               cfg.cliprange_value)
                loss = pg_loss + cfg.vf_coef * vf_loss
                # One entropy pass (a softmax over the vocabulary): with grad only when it is in the loss.
                entropy = masked_mean(entropy_from_logits(logits if cfg.ent_coef > 0 else logits.detach(),
                                                          cfg.temperature), mask)
                if cfg.ent_coef > 0:
                    loss = loss - cfg.ent_coef * entropy
                # Micro-batch losses are token means; weight them by their share of the mini-batch.
                accelerator.backward(loss * mask.sum() / mb_tokens)
                if empty:
                    continue
                for k, v in zip(UPDATE_STATS, (pg_loss, vf_loss, loss, pg_stats["approxkl"], pg_stats["clipfrac"],
                                               vf_stats["clipfrac"], entropy,
                                               explained_variance(vpred.detach(), returns[i][:, rows], mask)),
                                      strict=True):
                    v = float(v.detach()) if torch.is_tensor(v) else float(v)
                    if math.isfinite(v):
                        sums[k] = sums.get(k, 0.0) + v
                n += 1
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    # The same keys on every rank (NaN where none was finite): metrics are reduced key by key.
    stats = {k: sums[k] / max(n, 1) if k in sums else math.nan for k in UPDATE_STATS}
    stats["perf/peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return stats


def rollout_metrics(b_scores, b_scores_pp, b_valid, b_kl, b_mask, b_resp_mask, b_logprobs, b_values, b_no_eos,
                    non_score, returns, advantages) -> dict[str, torch.Tensor]:
    """Per-rank step metrics (DESIGN.md names); sequence sums are averaged over valid samples."""
    n_valid = b_valid.sum().clamp(min=1)
    reward_mean = (b_scores * b_valid).sum() / n_valid
    return {
        "env/reward_mean": reward_mean,
        "env/reward_std": torch.sqrt(((b_scores - reward_mean) ** 2 * b_valid).sum() / n_valid),
        "objective/kl": (b_kl * b_mask).sum() / n_valid,  # sequence KL, nats
        "objective/entropy": (-b_logprobs * b_mask).sum() / n_valid,  # sequence, sampled-token estimate
        "ppo/mean_scores": (b_scores_pp * b_valid).sum() / n_valid,
        "ppo/mean_non_score_reward": (non_score * b_mask).sum() / n_valid,
        "ppo/returns/mean": masked_mean(returns, b_mask),
        "ppo/val/mean": masked_mean(b_values, b_mask),
        "ppo/advantages_mean": masked_mean(advantages, b_mask),
        "rollout/response_len_mean": b_resp_mask.sum(1).mean(),
        "rollout/no_eos_frac": b_no_eos.float().mean(),
    }
