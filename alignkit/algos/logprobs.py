"""Per-token log-probabilities and entropies from logits, one batch row at a time.

Logits are (B, T, V) and already aligned with the tokens they score (``logits[:, t]``
predicts ``tokens[:, t]``). A full float32 ``log_softmax`` of a (B, T, V) batch is the
largest tensor of a PPO step for a 150k vocabulary, so the float32 temporaries here are
one row (T, V) at a time; bf16/fp16 logits are upcast row by row because ``logsumexp`` in
bf16 is too coarse for PPO ratios (TRL ``selective_log_softmax``).

``temperature`` must be the one used for sampling: the rollout distribution is
softmax(logits / temperature), and the PPO ratio and KL are only correct against it
(Huang et al. 2023, "The N Implementation Details of RLHF with PPO": without the scaling
the KL rises too fast).
"""

from __future__ import annotations

import torch


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32)


def logprobs_from_logits(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log softmax(logits / temperature) at ``tokens``: (B, T, V), (B, T) -> (B, T) float32."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = _compute_dtype(logits)
    selected = torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1).to(dtype) / temperature
    logsumexp = torch.stack([torch.logsumexp(row.to(dtype) / temperature, dim=-1) for row in logits])
    return selected - logsumexp


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """TRL's name for ``logprobs_from_logits`` at temperature 1: (B, T, V), (B, T) -> (B, T)."""
    return logprobs_from_logits(logits, index)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position: (B, T, V) -> (B, T) float32."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = _compute_dtype(logits)
    entropies = []
    for row in logits:
        logp = torch.log_softmax(row.to(dtype) / temperature, dim=-1)  # (T, V)
        entropies.append(-(logp.exp() * logp).sum(-1))
    return torch.stack(entropies)
