"""KL estimators between the policy and the reference, and the KL-coefficient controllers."""

from __future__ import annotations

from typing import Any

import torch

KL_KINDS = ("kl", "abs", "mse", "full")


def kl_penalty(
    logprob: torch.Tensor,
    ref_logprob: torch.Tensor,
    kind: str,
    logits: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token KL(policy || ref) estimate, (B, T), from log-probs of the sampled tokens.

    kind: ``kl`` k1 = logp - ref_logp (unbiased, can be negative per token; Ziegler et al.
    2019), ``abs`` |k1|, ``mse`` ½ k1² (Schulman 2020 "Approximating KL divergence", k2),
    ``full`` the exact KL over the vocabulary from ``logits`` and ``ref_logits`` (B, T, V),
    both taken at the sampling ``temperature``.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL kind {kind!r}; expected one of {', '.join(KL_KINDS)}")
    k1 = logprob - ref_logprob
    if kind == "kl":
        return k1
    if kind == "abs":
        return k1.abs()
    if kind == "mse":
        return 0.5 * k1.square()
    if logits is None or ref_logits is None:
        raise ValueError("kl kind 'full' needs both logits and ref_logits (B, T, V)")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    rows = []
    # One row at a time: two float32 (T, V) log_softmax copies instead of two (B, T, V).
    for row, ref_row in zip(logits, ref_logits, strict=True):
        logp = torch.log_softmax(row.to(dtype) / temperature, dim=-1)
        ref_logp = torch.log_softmax(ref_row.to(dtype) / temperature, dim=-1)
        rows.append((logp.exp() * (logp - ref_logp)).sum(-1))
    return torch.stack(rows)


KL_LOSS_ESTIMATORS = ("k1", "k2", "k3")


def kl_loss_terms(logprob: torch.Tensor, ref_logprob: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL(policy || ref) estimates to use as a *loss* term (GRPO style), (B, T).

    From Schulman (2020), "Approximating KL divergence", with r = ref/policy on sampled tokens:
    ``k1`` = -log r (unbiased, high variance, can be negative), ``k2`` = ½ (log r)² (biased, low
    variance), ``k3`` = (r - 1) - log r (unbiased, low variance, always >= 0; GRPO's choice,
    Shao et al. 2024 eq. 4). The log-ratio is clamped to ±20 so exp(r) cannot overflow.
    """
    log_r = (ref_logprob - logprob).clamp(-20, 20)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r.square()
    if estimator == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {', '.join(KL_LOSS_ESTIMATORS)}")


class FixedKLController:
    """A constant KL coefficient ``value``; ``update`` is a no-op."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Proportional controller that steers the observed KL towards ``target``.

    Ziegler et al. 2019, section 2.2: e_t = clip(KL_t / target - 1, -0.2, 0.2),
    beta_{t+1} = beta_t (1 + K_beta e_t) with K_beta = n_steps / horizon, where n_steps is
    the number of samples (episodes) in the batch just collected.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        super().__init__(init_kl_coef)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon
