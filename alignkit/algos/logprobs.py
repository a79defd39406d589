"""Per-token log-probabilities and entropies from logits, a chunk of positions at a time.

Logits are (B, T, V) and already aligned with the tokens they score (``logits[:, t]``
predicts ``tokens[:, t]``). A float32 ``log_softmax`` of the whole (B, T, V) batch is the
largest tensor of a PPO step for a real vocabulary (Qwen's 152k: 4.9 GB for 64 x 128 tokens),
and autograd keeps it for the backward pass. Here nothing of size (B, T, V) is ever made
besides the logits the caller holds and, in the backward pass, their gradient:

- the forward pass works on ``CHUNK_ELEMENTS // V`` positions at a time (a (n, V) float32
  block of at most 64 MB) and keeps only the (B, T) logsumexp;
- the backward pass recomputes each chunk's softmax from the logits and the saved logsumexp
  (``d logp(y) / dz = onehot(y) - softmax(z)``) and writes that chunk of the gradient.

bf16/fp16 logits are upcast chunk by chunk because ``logsumexp`` in bf16 is too coarse for PPO
ratios (TRL ``selective_log_softmax``); the gradient is returned in the logits' dtype.

``temperature`` must be the one used for sampling: the rollout distribution is
softmax(logits / temperature), and the PPO ratio and KL are only correct against it
(Huang et al. 2023, "The N Implementation Details of RLHF with PPO": without the scaling
the KL rises too fast).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

CHUNK_ELEMENTS = 1 << 24  # float32 elements of one (positions, V) block: 64 MB


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32)


def _chunks(logits: torch.Tensor) -> list[tuple[int, slice]]:
    """(row, positions) blocks of (B, T, V) logits; by row so that a sliced view (``logits[:, :-1]``)
    is never flattened, which would copy it whole."""
    B, T, V = logits.shape
    step = max(1, CHUNK_ELEMENTS // max(V, 1))
    return [(b, slice(i, min(i + step, T))) for b in range(B) for i in range(0, T, step)]


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


class _SelectedLogSoftmax(torch.autograd.Function):
    """log softmax(z / temperature)[y] over (B, T, V) logits, chunked both ways."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, index: torch.Tensor, temperature: float) -> torch.Tensor:
        dtype = _compute_dtype(logits)
        out = torch.empty(logits.shape[:2], dtype=dtype, device=logits.device)  # (B, T)
        lse = torch.empty_like(out)
        for b, c in _chunks(logits):
            z = logits[b, c].to(dtype) / temperature  # (n, V)
            lse[b, c] = torch.logsumexp(z, dim=-1)
            out[b, c] = z.gather(-1, index[b, c, None]).squeeze(-1) - lse[b, c]
        ctx.save_for_backward(logits, index, lse)
        ctx.temperature = temperature
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        logits, index, lse = ctx.saved_tensors
        t = ctx.temperature
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        for b, c in _chunks(logits):
            g = grad_out[b, c, None].to(lse.dtype)  # (n, 1)
            gz = torch.exp(logits[b, c].to(lse.dtype) / t - lse[b, c, None]).mul_(-g)  # -g * softmax
            gz.scatter_add_(-1, index[b, c, None], g)  # + g at the selected token
            grad[b, c] = gz.div_(t)
        return grad, None, None


class _Entropy(torch.autograd.Function):
    """Entropy of softmax(z / temperature) over (B, T, V) logits, chunked both ways."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        dtype = _compute_dtype(logits)
        out = torch.empty(logits.shape[:2], dtype=dtype, device=logits.device)  # (B, T)
        for b, c in _chunks(logits):
            logp = torch.log_softmax(logits[b, c].to(dtype) / temperature, dim=-1)  # (n, V)
            out[b, c] = -(logp.exp() * logp).sum(-1)
        ctx.save_for_backward(logits, out)
        ctx.temperature = temperature
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        # H = -sum p log p with p = softmax(z / t):  dH/dz_j = -p_j (log p_j + H) / t.
        logits, entropy = ctx.saved_tensors
        t = ctx.temperature
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        for b, c in _chunks(logits):
            logp = torch.log_softmax(logits[b, c].to(entropy.dtype) / t, dim=-1)  # (n, V)
            p = logp.exp()
            grad[b, c] = p.mul_(logp.add_(entropy[b, c, None])).mul_(-grad_out[b, c, None] / t)
        return grad, None


def logprobs_from_logits(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log softmax(logits / temperature) at ``tokens``: (B, T, V), (B, T) -> (B, T) float32."""
    _check_temperature(temperature)
    return _SelectedLogSoftmax.apply(logits, tokens, float(temperature))


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """TRL's name for ``logprobs_from_logits`` at temperature 1: (B, T, V), (B, T) -> (B, T)."""
    return logprobs_from_logits(logits, index)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position: (B, T, V) -> (B, T) float32."""
    _check_temperature(temperature)
    return _Entropy.apply(logits, float(temperature))
