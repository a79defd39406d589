"""alignkit: RLHF with SFT, reward models and PPO with a value head."""
__version__ = "0.1.0"
