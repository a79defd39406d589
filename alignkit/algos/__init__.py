"""Pure tensor math for RLHF: log-probs, KL, reward shaping, GAE, whitening, policy losses.

Functions take tensors and masks and return tensors; the training loop owns the config.
"""

from alignkit.algos.kl import (
    KL_KINDS,
    KL_LOSS_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_loss_terms,
    kl_penalty,
)
from alignkit.algos.logprobs import entropy_from_logits, logprobs_from_logits, selective_log_softmax
from alignkit.algos.losses import LOSS_ALIASES, POLICY_LOSSES, LossInputs, compute_policy_loss, register_loss
from alignkit.algos.normalize import masked_mean, masked_var, masked_whiten
from alignkit.algos.ppo import (
    LOSS_AGG_MODES,
    aggregate_loss,
    compute_gae,
    explained_variance,
    value_loss,
)
from alignkit.algos.shaping import (
    RunningMoments,
    overlong_penalty,
    postprocess_scores,
    shape_rewards,
)

__all__ = [
    "KL_KINDS",
    "KL_LOSS_ESTIMATORS",
    "LOSS_AGG_MODES",
    "aggregate_loss",
    "kl_loss_terms",
    "overlong_penalty",
    "AdaptiveKLController",
    "FixedKLController",
    "RunningMoments",
    "compute_gae",
    "entropy_from_logits",
    "explained_variance",
    "kl_penalty",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "LOSS_ALIASES",
    "POLICY_LOSSES",
    "LossInputs",
    "compute_policy_loss",
    "register_loss",
    "postprocess_scores",
    "selective_log_softmax",
    "shape_rewards",
    "value_loss",
]
