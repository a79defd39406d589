"""GAE against a reference loop (hypothesis), and the PPO policy/value losses on constructed inputs."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alignkit.algos import compute_gae, explained_variance, value_loss
from alignkit.algos.losses import LossInputs, ppo_clip


def reference_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """Textbook GAE for one episode: the value after the last step is 0."""
    advantages, lastgaelam = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages[t] = lastgaelam
    return advantages


finite = st.floats(-10, 10, allow_nan=False)


@st.composite
def padded_episodes(draw):
    """Rows of random length 1..T; padding filled with large garbage that must not leak."""
    batch, width = draw(st.integers(1, 4)), draw(st.integers(1, 8))
    lengths = draw(st.lists(st.integers(1, width), min_size=batch, max_size=batch))
    rows = [
        (draw(st.lists(finite, min_size=n, max_size=n)), draw(st.lists(finite, min_size=n, max_size=n)))
        for n in lengths
    ]
    return width, rows


@settings(max_examples=150, deadline=None)
@given(padded_episodes(), st.floats(0, 1), st.floats(0, 1))
def test_gae_matches_reference_loop(episodes, gamma, lam):
    width, rows = episodes
    rewards = torch.full((len(rows), width), 1e3, dtype=torch.float64)
    values = torch.full((len(rows), width), -1e3, dtype=torch.float64)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (r, v) in enumerate(rows):
        rewards[i, : len(r)] = torch.tensor(r, dtype=torch.float64)
        values[i, : len(v)] = torch.tensor(v, dtype=torch.float64)
        mask[i, : len(r)] = 1

    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)

    for i, (r, v) in enumerate(rows):
        expected = reference_gae(r, v, gamma, lam)
        padding = [0.0] * (width - len(r))
        assert advantages[i].tolist() == pytest.approx(expected + padding, abs=1e-9)
        assert returns[i].tolist() == pytest.approx(
            [a + b for a, b in zip(expected, v, strict=True)] + padding, abs=1e-9
        )


def test_gae_hand_computed():
    # gamma = lam = 1: returns are the reward-to-go. delta_1 = 2 - 1 = 1, delta_0 = 1 + 1 - 0.5.
    advantages, returns = compute_gae(
        torch.tensor([[1.0, 2.0, 9.0]]), torch.tensor([[0.5, 1.0, 9.0]]), torch.tensor([[1, 1, 0]]), 1.0, 1.0
    )
    assert advantages.tolist() == [[2.5, 1.0, 0.0]]
    assert returns.tolist() == [[3.0, 2.0, 0.0]]


def test_policy_loss_clips_constructed_ratios():
    # Row 0: A = +1, ratios 0.5 (not clipped: pessimistic side), 1.0, 1.1, 1.5 (clipped to 1.2).
    # Row 1: A = -1, ratios 0.5 (clipped to 0.8), 1.5 (not clipped), then padding with ratio 3.
    ratios = torch.tensor([[0.5, 1.0, 1.1, 1.5], [0.5, 1.5, 3.0, 3.0]], dtype=torch.float64)
    old_logprobs = torch.full_like(ratios, -2.0)
    logprobs = (old_logprobs + ratios.log()).requires_grad_()
    advantages = torch.tensor([[1.0] * 4, [-1.0] * 4], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])

    loss, stats = ppo_clip(LossInputs(logprobs, old_logprobs, advantages, mask.float(), 0.2, 0.2))
    loss.backward()

    assert loss.item() == pytest.approx((-0.5 - 1.0 - 1.1 - 1.2 + 0.8 + 1.5) / 6)
    assert stats["clipfrac"].item() == pytest.approx(2 / 6)
    real_log_ratios = ratios[mask.bool()].log()
    assert stats["approxkl"].item() == pytest.approx(0.5 * (real_log_ratios**2).mean().item())
    # No gradient through clipped tokens or padding; -A * ratio / n elsewhere.
    expected_grad = torch.tensor([[-0.5, -1.0, -1.1, 0.0], [0.0, 1.5, 0.0, 0.0]]) / 6
    torch.testing.assert_close(logprobs.grad, expected_grad.double())


def test_value_loss_clips_towards_old_values():
    # old = 0, cliprange 0.2. v=0.1: inside the range. v=0.5 -> 0.2, clipped loss (0.8²) is larger.
    # v=-0.5 -> -0.2, unclipped loss (1.5²) is larger. Last column is padding.
    values = torch.tensor([[0.1, 0.5, -0.5, 50.0]], requires_grad=True)
    returns = torch.tensor([[1.0, 1.0, 1.0, -50.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = value_loss(values, torch.zeros(1, 4), returns, mask, cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.81 + 0.64 + 2.25) / 3)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    loss.backward()
    assert values.grad[0, 1].item() == 0.0 and values.grad[0, 3].item() == 0.0


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 5.0, -99.0, -99.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 3.0), returns, mask).item() == pytest.approx(0.0)
    # Real returns [1, 2, 3, 4, 5] have variance 2; residuals [1, -1, 0, 1, -1] have variance 0.8.
    values = returns + torch.tensor([[1.0, -1.0, 0.0, 7.0], [1.0, -1.0, 7.0, 7.0]])
    assert explained_variance(values, returns, mask).item() == pytest.approx(1 - 0.8 / 2.0)
    assert math.isnan(explained_variance(returns, torch.ones(2, 4), mask).item())
