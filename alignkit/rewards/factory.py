"""Build the configured ``RewardSource`` for PPO; the trainer never knows which one it holds."""

from __future__ import annotations

from alignkit.rewards.base import RewardSource


def build_reward_source(cfg, policy_model=None) -> RewardSource:
    """``reward_model_type`` → rule | api | lora (RM adapter on the policy's base) | full (own model)."""
    kind = cfg.reward_model_type
    if kind == "rule":
        from alignkit.rewards.rules import RuleReward

        return RuleReward(cfg.reward_model)
    if kind == "api":
        from alignkit.rewards.api import RewardApiConfig, build_api_reward

        settings = dict(cfg.reward_api or {})
        if cfg.reward_model and not settings.get("url"):
            settings["url"] = cfg.reward_model
        return build_api_reward(RewardApiConfig(**settings))
    from alignkit.rewards.model import build_model_reward

    return build_model_reward(cfg, policy_model)
