"""Chunked log-probs and entropy (alignkit.algos.logprobs): the same values and gradients as the
plain full-vocabulary computation, whatever the chunking, and no (B, T, V) temporaries kept for backward."""

from __future__ import annotations

import pytest
import torch

from alignkit.algos import entropy_from_logits, logprobs_from_logits
from alignkit.algos import logprobs as lp


def reference(logits: torch.Tensor, tokens: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    logp = torch.log_softmax(logits.float() / t, -1)
    return logp.gather(-1, tokens[..., None])[..., 0], -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("chunk", [1, 7, 1 << 24])  # one position, a few (across row ends), whole rows
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients_match_the_full_computation(monkeypatch, chunk, temperature):
    monkeypatch.setattr(lp, "CHUNK_ELEMENTS", chunk * 13)
    torch.manual_seed(0)
    full = (torch.randn(3, 6, 13) * 3).requires_grad_()
    logits, tokens = full[:, :-1], torch.randint(0, 13, (3, 5))  # a sliced view, as ActorCritic returns
    w1, w2 = torch.randn(3, 5), torch.randn(3, 5)
    got_lp, got_h = logprobs_from_logits(logits, tokens, temperature), entropy_from_logits(logits, temperature)
    (got_grad,) = torch.autograd.grad((got_lp * w1).sum() + (got_h * w2).sum(), full)
    want_lp, want_h = reference(logits, tokens, temperature)
    (want_grad,) = torch.autograd.grad((want_lp * w1).sum() + (want_h * w2).sum(), full)
    torch.testing.assert_close(got_lp, want_lp)
    torch.testing.assert_close(got_h, want_h)
    torch.testing.assert_close(got_grad, want_grad)


def test_bf16_logits_get_bf16_gradients_of_float32_math():
    torch.manual_seed(3)
    logits = (torch.randn(2, 4, 50) * 4).to(torch.bfloat16).requires_grad_()
    tokens = torch.randint(0, 50, (2, 4))
    got = logprobs_from_logits(logits, tokens, 0.9)
    (grad,) = torch.autograd.grad(got.sum(), logits)
    assert got.dtype == torch.float32 and grad.dtype == torch.bfloat16
    ref = logits.detach().float().requires_grad_()
    (want,) = torch.autograd.grad(reference(ref, tokens, 0.9)[0].sum(), ref)
    torch.testing.assert_close(grad.float(), want, atol=1e-2, rtol=1e-2)


def test_the_graph_keeps_the_logits_and_one_value_per_position_only():
    """What autograd saves for backward: the caller's logits (no copy), the tokens and the (B, T)
    logsumexp; a plain log_softmax would keep a second (B, T, V) tensor."""
    logits = torch.randn(4, 8, 1000, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        logprobs_from_logits(logits, torch.zeros(4, 8, dtype=torch.long), 0.8)
        entropy_from_logits(logits, 0.8)
    big = [t for t in saved if t.numel() >= logits.numel()]
    assert all(t.data_ptr() == logits.data_ptr() for t in big) and len(big) == 2
    assert sum(t.numel() for t in saved if t.data_ptr() != logits.data_ptr()) <= 4 * 4 * 8
