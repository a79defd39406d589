"""The PPO stage's config: the shared keys, the reward keys (``RewardSpec``), rollout and PPO
hyper-parameters."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from alignkit.config import StageConfig, register_stage
from alignkit.rewards.spec import RewardContext, RewardSpec


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
    # PPO
    ppo_buffer_size: int = Field(1, ge=1, description="Mini-batches per rollout batch (rollout = per_device x accum x buffer).")
    ppo_epochs: int = Field(4, ge=1, description="Passes over each rollout batch.")
    init_kl_coef: float = Field(0.2, ge=0.0, description="Initial KL penalty coefficient.")
    adap_kl_ctrl: bool = Field(True, description="Adaptive KL controller (Ziegler et al. 2019) instead of fixed.")
    ppo_target: float = Field(6.0, gt=0.0, description="Adaptive controller's target KL (nats per sequence).")
    kl_horizon: int = Field(10000, ge=1, description="Adaptive controller's horizon (samples).")
    kl_penalty: Literal["kl", "abs", "mse", "full"] = Field("kl", description="Per-token KL estimator.")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="Discount factor.")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="GAE lambda.")
    cliprange: float = Field(0.2, gt=0.0, description="Policy ratio clip range.")
    cliprange_value: float = Field(0.2, gt=0.0, description="Value clip range.")
    vf_coef: float = Field(0.1, ge=0.0, description="Value loss coefficient.")
    ent_coef: float = Field(0.0, ge=0.0, description="Entropy bonus coefficient.")
    whiten_advantages: bool = Field(True, description="Whiten advantages per rollout batch.")
    ppo_whiten_rewards: bool = Field(False, description="Whiten shaped rewards before GAE.")
    ppo_score_norm: bool = Field(False, description="Normalise scores by their running mean/std.")
    score_clip: float | None = Field(None, gt=0.0, description="Clip (normalised) scores to +-score_clip.")
    missing_eos_penalty: float | None = Field(None, description="Subtracted from the score of responses without EOS.")
    critic_adapter: bool = Field(False, description="Give the critic its own LoRA adapter instead of sharing the policy's.")
    # Defaults that suit PPO better than SFT's.
    per_device_eval_batch_size: int = Field(16, ge=1, description="Rows per no-grad forward pass (old/ref log-probs, values).")
    learning_rate: float = Field(1e-5, gt=0, description="Peak learning rate.")
    save_steps: int = Field(50, ge=1, description="Checkpoint every N PPO steps.")
    logging_steps: int = Field(1, ge=1, description="Log metrics every N PPO steps.")
    num_train_epochs: float = Field(1.0, gt=0, description="Passes over the prompt set (ignored if max_steps>0).")

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
        """Prompts per rank per PPO step."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.ppo_buffer_size


register_stage("ppo", PPOConfig)
