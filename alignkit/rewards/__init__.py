"""Reward sources behind one interface (``RewardSource``): rules, an HTTP judge, a trained RM."""

from alignkit.rewards.base import RewardSource, Score, ScoreMeta

__all__ = ["RewardSource", "Score", "ScoreMeta"]
