"""Offline preference losses: DPO and its variants (IPO, hinge, ORPO, SimPO) and KTO.

Every loss takes per-sequence log-probabilities of the response tokens, (B,) float tensors, and
returns per-pair (or per-row, for KTO) losses, (B,); the caller sums or averages them. Inputs
are sums over response tokens unless a docstring says "average" (IPO, ORPO and SimPO are defined
on length-normalised log-probs; ``sequence_logps(..., average=True)``).

The implicit reward of a response is ``beta * (log pi(y|x) - log pi_ref(y|x))`` for the losses
with a reference, and ``beta * avg log pi(y|x)`` for the reference-free ones (ORPO, SimPO); TRL
logs both as ``rewards/chosen`` and ``rewards/rejected``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Sum (or, with ``average``, mean) of token log-probs over the response: (B, T), (B, T) -> (B,)."""
    total = (token_logps * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def implicit_rewards(logps: torch.Tensor, ref_logps: torch.Tensor | None, beta: float) -> torch.Tensor:
    """``beta * (logps - ref_logps)``, or ``beta * logps`` without a reference: (B,) -> (B,), detached."""
    diff = logps if ref_logps is None else logps - ref_logps
    return (beta * diff).detach()


def _logits(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
            ref_rejected: torch.Tensor) -> torch.Tensor:
    """h = (log pi(y_w) - log pi(y_l)) - (log pi_ref(y_w) - log pi_ref(y_l)): (B,)."""
    return (chosen - rejected) - (ref_chosen - ref_rejected)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7): ``-log sigmoid(beta * h)``; (B,) x 4 -> (B,).

    ``label_smoothing`` eps > 0 is conservative DPO (Mitchell 2023, "A note on DPO with noisy
    preferences"): each label is flipped with probability eps, so the loss is
    ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``.
    """
    h = beta * _logits(chosen, rejected, ref_chosen, ref_rejected)
    return -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


def hinge_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
               beta: float) -> torch.Tensor:
    """SLiC's hinge on the DPO log-ratio (Zhao et al. 2023; TRL ``hinge``): ``relu(1 - beta * h)``; (B,)."""
    return torch.relu(1 - beta * _logits(chosen, rejected, ref_chosen, ref_rejected))


def ipo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17): ``(h - 1 / (2 beta))**2`` on average log-probs; (B,).

    The squared loss regresses the log-ratio gap to a finite target instead of pushing it to
    infinity, which is what makes DPO overfit deterministic preferences (section 4.2).
    """
    return (_logits(chosen, rejected, ref_chosen, ref_rejected) - 1 / (2 * beta)) ** 2


def orpo_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float) -> torch.Tensor:
    """ORPO (Hong et al. 2024, eq. 6-7), no reference model: NLL of the chosen response plus
    ``beta`` (the paper's lambda) times ``-log sigmoid(log odds(y_w) - log odds(y_l))``; (B,).

    Inputs are average log-probs; ``odds(y) = p / (1 - p)`` with ``p = exp(avg log-prob)``, so
    ``log odds = avg - log(1 - exp(avg))`` (``log1p(-exp)``, finite for avg < 0).
    """
    log_odds = (chosen_avg - rejected_avg) - (torch.log1p(-torch.exp(chosen_avg)) - torch.log1p(-torch.exp(rejected_avg)))
    return -chosen_avg - beta * F.logsigmoid(log_odds)


def simpo_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SimPO (Meng et al. 2024, eq. 6), no reference model: ``-log sigmoid(beta * (avg_w - avg_l) - gamma)``
    on average log-probs, with target reward margin ``gamma``; (B,)."""
    return -F.logsigmoid(beta * (chosen_avg - rejected_avg) - gamma)


def kto_reference_point(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's z0 (Ethayarajh et al. 2024, eq. 8): the batch's KL(pi || pi_ref) estimated on
    mismatched (prompt, response) pairs, clamped at 0 and detached (it is not backpropagated):
    (B,), (B,) -> scalar."""
    return (kl_logps - ref_kl_logps).mean().clamp(min=0).detach()


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, z0: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024, eq. 8) on unpaired rows; (B,) x 3, scalar -> (B,).

    With r = log pi(y|x) - log pi_ref(y|x), a desirable row costs ``w_d * (1 - sigmoid(beta (r - z0)))``
    and an undesirable one ``w_u * (1 - sigmoid(beta (z0 - r)))``. ``desirable`` is a (B,) bool.
    """
    r = logps - ref_logps
    good = desirable_weight * (1 - torch.sigmoid(beta * (r - z0)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r)))
    return torch.where(desirable, good, bad)
