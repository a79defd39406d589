"""Preference losses against hand-computed numbers and a plain-Python reference loop."""

from __future__ import annotations

import math
import random

import pytest
import torch

from alignkit.algos.preference import (
    dpo_loss,
    hinge_loss,
    implicit_rewards,
    ipo_loss,
    kto_loss,
    kto_reference_point,
    orpo_loss,
    sequence_logps,
    simpo_loss,
)


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def softplus(x: float) -> float:  # -log sigmoid(-x)
    return math.log1p(math.exp(x))


# policy chosen/rejected -1/-2 and reference -1.5/-1.5: the log-ratio gap h is 1.
PAIR = (t(-1.0), t(-2.0), t(-1.5), t(-1.5))


def test_sequence_logps_sums_or_averages_response_tokens():
    token = t(-1.0, -2.0, -3.0).unsqueeze(0)
    mask = t(0, 1, 1).unsqueeze(0)
    assert sequence_logps(token, mask).item() == -5.0
    assert sequence_logps(token, mask, average=True).item() == -2.5


def test_dpo_sigmoid_by_hand():
    assert dpo_loss(*PAIR, beta=0.5).item() == pytest.approx(softplus(-0.5))  # -log sigmoid(0.5) = 0.474077
    # Conservative DPO, eps = 0.1: 0.9 * -log sigmoid(0.5) + 0.1 * -log sigmoid(-0.5)
    smoothed = dpo_loss(*PAIR, beta=0.5, label_smoothing=0.1).item()
    assert smoothed == pytest.approx(0.9 * softplus(-0.5) + 0.1 * softplus(0.5)) and smoothed == pytest.approx(0.524077, abs=1e-6)
    # Policy equal to the reference: every pair costs log 2, whatever beta.
    same = dpo_loss(t(-3.0, -7.0), t(-4.0, -1.0), t(-3.0, -7.0), t(-4.0, -1.0), beta=0.3)
    assert torch.allclose(same, torch.full((2,), math.log(2), dtype=torch.float64))


def test_hinge_and_ipo_by_hand():
    assert hinge_loss(*PAIR, beta=0.5).item() == pytest.approx(0.5)  # relu(1 - 0.5 * 1)
    assert hinge_loss(*PAIR, beta=2.0).item() == 0.0  # past the margin: no loss, no gradient
    assert ipo_loss(*PAIR, beta=0.5).item() == pytest.approx(0.0)  # h = 1 = 1 / (2 beta): on target
    assert ipo_loss(*PAIR, beta=0.25).item() == pytest.approx(1.0)  # (1 - 2)**2


def test_orpo_by_hand():
    # p_w = 0.5 -> odds 1; p_l = 0.25 -> odds 1/3; log odds ratio = log 3.
    loss = orpo_loss(t(math.log(0.5)), t(math.log(0.25)), beta=0.1).item()
    assert loss == pytest.approx(math.log(2) + 0.1 * math.log(4 / 3))  # NLL + lambda * -log sigmoid(log 3)


def test_simpo_by_hand():
    assert simpo_loss(t(-1.0), t(-2.0), beta=2.0, gamma=1.0).item() == pytest.approx(softplus(-1.0))


def test_kto_by_hand():
    logps, ref = t(-1.0, -1.0), t(-2.0, -2.0)  # r = 1 for both rows
    desirable = torch.tensor([True, False])
    loss = kto_loss(logps, ref, desirable, torch.tensor(0.5, dtype=torch.float64), beta=1.0, desirable_weight=2.0)
    sig = 1 / (1 + math.exp(-0.5))
    assert loss.tolist() == pytest.approx([2 * (1 - sig), 1 - (1 - sig)])  # 2(1 - s(0.5)), 1 - s(-0.5)
    assert kto_reference_point(t(-1.0, -3.0), t(-2.0, -2.0)).item() == 0.0  # mean 0
    assert kto_reference_point(t(-3.0, -3.0), t(-2.0, -2.0)).item() == 0.0  # negative KL estimate: clamped
    assert kto_reference_point(t(0.0, 0.0), t(-2.0, -2.0)).item() == 2.0


def test_implicit_rewards_with_and_without_reference():
    assert implicit_rewards(t(-1.0), t(-3.0), 0.5).item() == 1.0
    assert implicit_rewards(t(-1.0), None, 0.5).item() == -0.5


def reference_loop(c, r, rc, rr, beta, gamma, eps):
    """Plain-Python values of each loss, one pair at a time."""
    out = {"sigmoid": [], "hinge": [], "ipo": [], "simpo": []}
    for cw, cl, rw, rl in zip(c, r, rc, rr, strict=True):
        h = (cw - cl) - (rw - rl)
        out["sigmoid"].append((1 - eps) * softplus(-beta * h) + eps * softplus(beta * h))
        out["hinge"].append(max(0.0, 1 - beta * h))
        out["ipo"].append((h - 1 / (2 * beta)) ** 2)
        out["simpo"].append(softplus(-(beta * (cw - cl) - gamma)))
    return out


def test_losses_match_a_reference_loop():
    rng = random.Random(0)
    c, r, rc, rr = ([rng.uniform(-30, -1) for _ in range(64)] for _ in range(4))
    beta, gamma, eps = 0.2, 0.7, 0.15
    want = reference_loop(c, r, rc, rr, beta, gamma, eps)
    args = (t(*c), t(*r), t(*rc), t(*rr))
    got = {"sigmoid": dpo_loss(*args, beta, eps), "hinge": hinge_loss(*args, beta), "ipo": ipo_loss(*args, beta),
           "simpo": simpo_loss(args[0], args[1], beta, gamma)}
    for name, values in got.items():
        assert values.tolist() == pytest.approx(want[name], rel=1e-9, abs=1e-12), name


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    chosen, rejected = t(-5.0).requires_grad_(), t(-5.0).requires_grad_()
    dpo_loss(chosen, rejected, t(-5.0), t(-5.0), beta=0.1).sum().backward()
    # d loss / d chosen = -beta * sigmoid(-beta h) = -0.05 at h = 0 (Rafailov et al. 2023, section 4).
    assert chosen.grad.item() == pytest.approx(-0.05) and rejected.grad.item() == pytest.approx(0.05)
