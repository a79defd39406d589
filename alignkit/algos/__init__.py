"""Pure tensor math for RLHF: log-probs, KL, reward shaping, GAE, whitening, PPO losses.

Functions take tensors and masks and return tensors; the training loop owns the config.
"""

from alignkit.algos.kl import KL_KINDS, AdaptiveKLController, FixedKLController, kl_penalty
from alignkit.algos.logprobs import entropy_from_logits, logprobs_from_logits, selective_log_softmax
from alignkit.algos.normalize import masked_mean, masked_var, masked_whiten
from alignkit.algos.ppo import compute_gae, explained_variance, policy_loss, value_loss
from alignkit.algos.shaping import RunningMoments, compute_rewards, postprocess_scores, shape_rewards

__all__ = [
    "KL_KINDS",
    "AdaptiveKLController",
    "FixedKLController",
    "RunningMoments",
    "compute_gae",
    "compute_rewards",
    "entropy_from_logits",
    "explained_variance",
    "kl_penalty",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "postprocess_scores",
    "selective_log_softmax",
    "shape_rewards",
    "value_loss",
]
