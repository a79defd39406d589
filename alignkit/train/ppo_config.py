"""The PPO stage's config: the shared keys, the reward keys (``RewardSpec``), rollout and PPO
hyper-parameters."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from alignkit.algos.advantages import ESTIMATOR_ALIASES, ESTIMATORS
from alignkit.config import StageConfig, register_stage
from alignkit.rewards.spec import RewardContext, RewardSpec

# Estimators whose KL sits in the loss (GRPO style, k3) unless use_kl_loss says otherwise; the
# others put a per-token KL penalty in the reward (PPO, RLOO, REINFORCE++).
KL_IN_LOSS = {"grpo", "dr_grpo"}


class PPOConfig(StageConfig, RewardSpec):
    stage: Literal["ppo"] = Field("ppo", description="Training stage.")
    # Rollout
    max_new_tokens: int = Field(128, ge=1, description="Response length limit in tokens.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature; log-probs use the same one.")
    top_k: int = Field(0, ge=0, description="Top-k sampling (0 = off).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling (1.0 = off).")
    rollout_chunk_size: int | None = Field(
        None, ge=1, description="Sample in chunks of this many prompts so scoring starts before the whole batch is done (default: one chunk)."
    )
    # Rollout engine (docs/vllm.md)
    rollout_engine: Literal["hf", "vllm"] = Field(
        "hf", description="hf: alignkit's KV-cache sampler on the trained model; vllm: a colocated vLLM engine, "
        "weights synced after every update (needs vLLM installed)."
    )
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0.0, le=1.0, description="vllm: share of device memory vLLM may take.")
    vllm_tensor_parallel_size: int = Field(1, ge=1, description="vllm: devices one engine shards the model over.")
    vllm_enable_sleep_mode: bool = Field(False, description="vllm: release vLLM's memory during the update (GPU only).")
    vllm_max_model_len: int | None = Field(None, ge=8, description="vllm: longest sequence (default: cutoff_len).")
    vllm_sync_tolerance: float = Field(
        0.05, gt=0.0, description="vllm: stop when the engine's and the trainer's log-probs of the sampled tokens "
        "differ by more than this (mean |diff| per token, checked every step with top_k 0 and top_p 1)."
    )
    # PPO
    ppo_buffer_size: int = Field(
        1, ge=1, description="Mini-batches per rollout batch: rollout = per_device x accum x buffer prompts per rank, "
        "each sampled num_generations times; per_device_train_batch_size counts prompts (with their groups)."
    )
    ppo_epochs: int = Field(4, ge=1, description="Passes over each rollout batch.")
    init_kl_coef: float = Field(
        0.2, ge=0.0, description="KL coefficient (alias beta): of the reward penalty, or of the loss term with "
        "use_kl_loss. Default 0.2 in the reward, 0.04 in the loss. 0 skips the reference pass entirely."
    )
    adap_kl_ctrl: bool = Field(
        True, description="Adaptive KL controller (Ziegler et al. 2019) instead of fixed (default: on for a KL "
        "in the reward, off for a KL loss)."
    )
    ppo_target: float = Field(6.0, gt=0.0, description="Adaptive controller's target KL (nats per sequence).")
    kl_horizon: int = Field(10000, ge=1, description="Adaptive controller's horizon (samples).")
    kl_penalty: Literal["kl", "abs", "mse", "full"] = Field("kl", description="Per-token KL estimator.")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="Discount factor.")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="GAE lambda.")
    cliprange: float = Field(0.2, gt=0.0, description="Policy ratio clip range.")
    cliprange_low: float | None = Field(None, gt=0.0, description="Ratio clipped below at 1 - cliprange_low (default cliprange).")
    cliprange_high: float | None = Field(
        None, gt=0.0, description="Ratio clipped above at 1 + cliprange_high (default cliprange; DAPO's clip-higher uses 0.28)."
    )
    cliprange_value: float = Field(0.2, gt=0.0, description="Value clip range.")
    vf_coef: float = Field(0.1, ge=0.0, description="Value loss coefficient.")
    ent_coef: float = Field(0.0, ge=0.0, description="Entropy bonus coefficient.")
    whiten_advantages: bool = Field(True, description="Whiten advantages per rollout batch.")
    ppo_whiten_rewards: bool = Field(False, description="Whiten shaped rewards before GAE.")
    ppo_score_norm: bool = Field(False, description="Normalise scores by their running mean/std.")
    score_clip: float | None = Field(None, gt=0.0, description="Clip (normalised) scores to +-score_clip.")
    missing_eos_penalty: float | None = Field(None, description="Subtracted from the score of responses without EOS.")
    # Advantage estimator and critic-free RL (docs/algorithms.md)
    advantage_estimator: str = Field(
        "gae", description="gae (PPO with a critic) | grpo | dr_grpo | rloo | reinforce_pp | reinforce_pp_baseline "
        "(OpenRLHF/verl spellings accepted: group_norm, reinforce, reinforce_baseline, reinforce_plus_plus, ...)."
    )
    num_generations: int = Field(
        1, ge=1, description="Responses sampled per prompt (alias n_samples_per_prompt); group estimators need >= 2."
    )
    use_kl_loss: bool = Field(
        False, description="KL as a loss term (beta * KL estimate) instead of a per-token reward penalty "
        "(default: true for grpo and dr_grpo)."
    )
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k3", description="Estimator of the KL loss term (Schulman 2020).")
    loss_agg_mode: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = Field(
        "token_mean", description="How token losses become one: token_mean, seq_mean_token_mean (GRPO), "
        "seq_mean_token_sum_norm (Dr. GRPO; default for dr_grpo)."
    )
    filter_zero_std_groups: bool = Field(
        False, description="Leave groups whose valid rewards are all equal out of the loss (DAPO dynamic sampling, counted)."
    )
    mask_truncated_completions: bool = Field(False, description="Leave responses without EOS out of the loss.")
    overlong_buffer_len: int | None = Field(
        None, ge=1, description="DAPO soft overlong penalty: the last N tokens before max_new_tokens lose reward linearly."
    )
    overlong_penalty_factor: float = Field(1.0, ge=0.0, description="The overlong penalty at max_new_tokens.")
    # Anti-hacking controls and detectors (docs/report.md)
    score_repetition_penalty: float | None = Field(
        None, ge=0.0, description="Subtracted from the score as a response's repeated n-gram share goes from "
        "score_repetition_threshold to 1 (linearly): against \"good good good ...\". Off by default."
    )
    score_repetition_ngram: int = Field(3, ge=1, description="n of the n-grams score_repetition_penalty counts (tokens).")
    score_repetition_threshold: float = Field(
        0.1, ge=0.0, lt=1.0, description="Repeated n-gram share a response may have before score_repetition_penalty starts."
    )
    log_samples: int = Field(4, ge=0, description="Rollouts written to samples.jsonl (and TensorBoard text) per logged step; 0: none.")
    log_samples_every: int = Field(5, ge=1, description="Write samples every N steps (and always at the first and last step).")
    reward_probe: str | None = Field(
        None, description="JSONL file of fixed {prompt, response[, label]} reference answers re-scored by the reward "
        "every reward_probe_every steps (probe/score_mean): a judge that drifts, or a policy that outscores good "
        "reference answers, shows in the report."
    )
    reward_probe_every: int = Field(10, ge=1, description="Score the reward_probe answers every N steps (and at the first).")
    critic_adapter: bool = Field(False, description="Give the critic its own LoRA adapter instead of sharing the policy's.")
    # Reference (LLaMA-Factory's keys); by default the policy's base with its LoRA adapter off.
    ref_model: str | None = Field(
        None, description="A separate reference model directory for the KL term (default: the policy's base with "
        "adapter_name_or_path merged, the LoRA adapter disabled: no second copy)."
    )
    ref_model_adapters: list[str] | None = Field(None, description="Adapters merged into ref_model, in order (comma list).")
    # Defaults that suit PPO better than SFT's.
    per_device_eval_batch_size: int = Field(16, ge=1, description="Rows per no-grad forward pass (old/ref log-probs, values).")
    learning_rate: float = Field(1e-5, gt=0, description="Peak learning rate.")
    save_steps: int = Field(50, ge=1, description="Checkpoint every N PPO steps.")
    logging_steps: int = Field(1, ge=1, description="Log metrics every N PPO steps.")
    num_train_epochs: float = Field(1.0, gt=0, description="Passes over the prompt set (ignored if max_steps>0).")

    @model_validator(mode="before")
    @classmethod
    def _estimator_defaults(cls, data: Any) -> Any:
        """Defaults that depend on the estimator, for keys the config does not set."""
        if not isinstance(data, dict):
            return data
        name = data.get("advantage_estimator", "gae")
        name = ESTIMATOR_ALIASES.get(name, name) if isinstance(name, str) else name
        data = {**data, "advantage_estimator": name}
        if isinstance(data.get("ref_model_adapters"), str):
            data["ref_model_adapters"] = [s.strip() for s in data["ref_model_adapters"].split(",") if s.strip()]
        kl_loss = data.setdefault("use_kl_loss", name in KL_IN_LOSS)
        data.setdefault("init_kl_coef", 0.04 if kl_loss else 0.2)
        data.setdefault("adap_kl_ctrl", not kl_loss)
        data.setdefault("loss_agg_mode", "seq_mean_token_sum_norm" if name == "dr_grpo" else "token_mean")
        return data

    @field_validator("advantage_estimator")
    @classmethod
    def _known_estimator(cls, name: str) -> str:
        if name not in ESTIMATORS:
            close = difflib.get_close_matches(name, sorted(ESTIMATORS) + sorted(ESTIMATOR_ALIASES), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown estimator {name!r}{hint} Known: {', '.join(sorted(ESTIMATORS))}")
        return name

    @model_validator(mode="after")
    def _check_reference_model(self) -> PPOConfig:
        if self.ref_model_adapters and not self.ref_model:
            raise ValueError("ref_model_adapters are merged into ref_model: set ref_model (the reference's base) too")
        if self.ref_model and not (Path(self.ref_model) / "config.json").is_file():
            raise ValueError(f"ref_model {self.ref_model!r} is not a model directory (no config.json); point it at "
                             "the reference model, or remove it to use the policy with its adapter disabled")
        return self

    @model_validator(mode="after")
    def _check_groups(self) -> PPOConfig:
        if self.has_critic:
            return self
        if self.critic_adapter:
            raise ValueError(f"critic_adapter: true needs a critic, but advantage_estimator: "
                             f"{self.advantage_estimator} has none; remove critic_adapter")
        grouped = self.advantage_estimator not in ("reinforce_pp",)
        if grouped and self.num_generations < 2:
            raise ValueError(f"advantage_estimator: {self.advantage_estimator} compares responses to the same "
                             "prompt: set num_generations >= 2 (e.g. 4)")
        return self

    @property
    def has_critic(self) -> bool:
        """A value head is built and trained only for estimators that read it (gae)."""
        return ESTIMATORS[self.advantage_estimator].needs_critic

    def reward_context(self) -> RewardContext:
        """What a trained reward model takes from this run: the policy's base and adapters (a LoRA
        RM must match them), its formatting fallbacks, and the no-grad forward-pass sizes."""
        return RewardContext(
            base_model=self.model_name_or_path, adapters=tuple(self.adapter_name_or_path or ()),
            template=self.template, default_system=self.default_system, enable_thinking=self.enable_thinking,
            cutoff_len=self.cutoff_len, batch_size=self.per_device_eval_batch_size, bf16=self.bf16, fp16=self.fp16,
        )

    @property
    def rollout_batch_size(self) -> int:
        """Prompts per rank per step (each sampled num_generations times)."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.ppo_buffer_size


register_stage("ppo", PPOConfig)
