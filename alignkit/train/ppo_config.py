"""The PPO stage's config: the shared keys, the reward keys (``RewardSpec``), rollout and PPO
hyper-parameters."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, SerializeAsAny, field_validator, model_validator

from alignkit.algos.advantages import ESTIMATOR_ALIASES, ESTIMATORS
from alignkit.algos.losses import LOSS_ALIASES, POLICY_LOSSES
from alignkit.config import StageConfig, register_stage
from alignkit.generation.registry import EngineSettings, HFSettings, engine_settings
from alignkit.rewards.spec import RewardContext, RewardSpec

# The flat keys of earlier releases (and LLaMA-Factory's vllm_* names), moved into ``rollout:``.
FLAT_ROLLOUT_KEYS = {"rollout_engine": "engine", "vllm_gpu_memory_utilization": "gpu_memory_utilization",
                     "vllm_tensor_parallel_size": "tensor_parallel_size", "vllm_enable_sleep_mode": "enable_sleep_mode",
                     "vllm_max_model_len": "max_model_len", "vllm_sync_tolerance": "sync_tolerance"}


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
    # Rollout engine (docs/vllm.md): a typed block per engine (alignkit.generation.registry).
    rollout: SerializeAsAny[EngineSettings] = Field(
        default_factory=HFSettings, description="The rollout engine and its settings: {engine: hf} (alignkit's "
        "KV-cache sampler on the trained model) or {engine: vllm, gpu_memory_utilization, tensor_parallel_size, "
        "enable_sleep_mode, max_model_len, sync_tolerance}. The flat keys rollout_engine and vllm_* are aliases."
    )
    dynamic_sampling: bool = Field(
        False, description="DAPO dynamic sampling: sample more prompts until the batch is filled with groups whose "
        "scores are not all equal (at most max_sampling_rounds rounds; rollout/sampling_rounds counts them)."
    )
    max_sampling_rounds: int = Field(3, ge=1, description="dynamic_sampling: rounds of sampling per step at most.")
    # Asynchronous off-policy RL and its importance-sampling correction (docs/algorithms.md)
    async_level: int = Field(
        0, ge=0, le=8, description="Batches sampled and scored ahead of the learner: 0 = on-policy; k >= 1 = the "
        "learner trains on samples up to k policy versions old while the judge scores the next k batches."
    )
    is_correction: Literal["tis", "mis", "none"] = Field(
        "tis", description="Correction of off-policy samples (stale, or an engine's own log-probs): tis = weights "
        "min(pi/pi_behaviour, is_cap); mis = drop tokens whose ratio leaves [is_mask_low, is_cap]; none."
    )
    is_cap: float = Field(2.0, gt=1.0, description="Upper bound C of the importance ratio (TIS truncation, MIS band).")
    is_mask_low: float = Field(0.5, gt=0.0, lt=1.0, description="mis: lower bound of the kept ratio band.")
    is_level: Literal["token", "sequence"] = Field(
        "token", description="Ratio per token, or per response (geometric mean of its token ratios)."
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
    policy_loss: str = Field(
        "ppo", description="ppo (clipped, per token) | gspo (sequence ratio, Qwen's for MoE) | cispo (clipped "
        "stop-gradient weights, MiniMax-M1); OpenRLHF/verl spellings (vanilla, gspo_token) accepted (docs/algorithms.md)."
    )
    cliprange: float = Field(0.2, gt=0.0, description="Policy ratio clip range.")
    cliprange_low: float | None = Field(
        None, gt=0.0, description="Ratio clipped below at 1 - cliprange_low (default: the loss's own, else cliprange)."
    )
    cliprange_high: float | None = Field(
        None, gt=0.0, description="Ratio clipped above at 1 + cliprange_high (default: the loss's own, else "
        "cliprange; DAPO's clip-higher uses 0.28)."
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
        "token_mean", description="How token losses become one: token_mean, seq_mean_token_mean (GRPO; default "
        "for gspo), seq_mean_token_sum_norm (Dr. GRPO; default for dr_grpo)."
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

    ALSO_ACCEPTED: ClassVar[frozenset[str]] = frozenset(FLAT_ROLLOUT_KEYS)

    @model_validator(mode="before")
    @classmethod
    def _spec_defaults(cls, data: Any) -> Any:
        """Aliases resolved, the flat rollout keys moved into ``rollout``, and the defaults the
        estimator's and the loss's specs carry for keys the config does not set (an explicit key
        wins, then the loss's default, then the estimator's)."""
        if not isinstance(data, dict):
            return data
        name, loss = data.get("advantage_estimator", "gae"), data.get("policy_loss", "ppo")
        name = ESTIMATOR_ALIASES.get(name, name) if isinstance(name, str) else name
        loss = LOSS_ALIASES.get(loss, loss) if isinstance(loss, str) else loss
        data = {**data, "advantage_estimator": name, "policy_loss": loss}
        if isinstance(data.get("ref_model_adapters"), str):
            data["ref_model_adapters"] = [s.strip() for s in data["ref_model_adapters"].split(",") if s.strip()]
        if flat := {FLAT_ROLLOUT_KEYS[k]: data.pop(k) for k in list(data) if k in FLAT_ROLLOUT_KEYS}:
            block = data.get("rollout")
            data["rollout"] = {**flat, **(block.model_dump() if isinstance(block, EngineSettings) else block or {})}
        spec = ESTIMATORS.get(name) if isinstance(name, str) else None
        loss_spec = POLICY_LOSSES.get(loss) if isinstance(loss, str) else None
        if spec is not None:
            kl_loss = data.setdefault("use_kl_loss", spec.kl_in_loss)
            data.setdefault("init_kl_coef", spec.beta if spec.beta is not None else 0.04 if kl_loss else 0.2)
            data.setdefault("adap_kl_ctrl", not kl_loss)
            data.setdefault("loss_agg_mode", (loss_spec and loss_spec.loss_agg_mode) or spec.loss_agg_mode)
        return data

    @field_validator("rollout", mode="before")
    @classmethod
    def _engine_settings(cls, v: Any) -> EngineSettings:
        return engine_settings(v)

    @field_validator("policy_loss")
    @classmethod
    def _known_loss(cls, name: str) -> str:
        return _known(name, "policy loss", POLICY_LOSSES, LOSS_ALIASES)

    @field_validator("advantage_estimator")
    @classmethod
    def _known_estimator(cls, name: str) -> str:
        return _known(name, "estimator", ESTIMATORS, ESTIMATOR_ALIASES)

    @model_validator(mode="after")
    def _check_reference_model(self) -> PPOConfig:
        if self.ref_model_adapters and not self.ref_model:
            raise ValueError("ref_model_adapters are merged into ref_model: set ref_model (the reference's base) too")
        if self.ref_model and not (Path(self.ref_model) / "config.json").is_file():
            raise ValueError(f"ref_model {self.ref_model!r} is not a model directory (no config.json); point it at "
                             "the reference model, or remove it to use the policy with its adapter disabled")
        return self

    @model_validator(mode="after")
    def _check_async(self) -> PPOConfig:
        if self.async_level and self.dynamic_sampling:
            raise ValueError("dynamic_sampling waits for each round's scores before it can decide to sample more, so "
                             "it cannot run ahead of the learner: set async_level: 0 or dynamic_sampling: false")
        return self

    @model_validator(mode="after")
    def _check_groups(self) -> PPOConfig:
        if self.has_critic:
            return self
        if self.critic_adapter:
            raise ValueError(f"critic_adapter: true needs a critic, but advantage_estimator: "
                             f"{self.advantage_estimator} has none; remove critic_adapter")
        if ESTIMATORS[self.advantage_estimator].needs_groups and self.num_generations < 2:
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
    def clip_range(self) -> tuple[float, float]:
        """``(low, high)``: the ratio is clipped to [1 - low, 1 + high]. An explicit key wins, then
        the loss's own default (GSPO's is 3e-4 / 4e-4), then ``cliprange``."""
        spec = POLICY_LOSSES[self.policy_loss]
        low = self.cliprange_low or spec.cliprange_low or self.cliprange
        return low, self.cliprange_high or spec.cliprange_high or self.cliprange

    @property
    def rollout_batch_size(self) -> int:
        """Prompts per rank per step (each sampled num_generations times)."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.ppo_buffer_size


def _known(name: str, what: str, registry: dict, aliases: dict[str, str]) -> str:
    if name not in registry:
        close = difflib.get_close_matches(name, sorted(registry) + sorted(aliases), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown {what} {name!r}{hint} Known: {', '.join(sorted(registry))}")
    return name


register_stage("ppo", PPOConfig)
