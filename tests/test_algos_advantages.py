"""Advantage estimators: hand-computed cases and reference-loop property tests."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alignkit.algos.advantages import (
    ESTIMATORS,
    AdvantageInputs,
    AdvantageParams,
    estimate,
    group_baseline,
    group_stats,
)

P = AdvantageParams()


def inputs(scores, groups, valid=None, R=3, rewards=None):
    scores = torch.tensor(scores, dtype=torch.float32)
    mask = torch.ones(len(scores), R)
    if rewards is None:  # score at the last token, no KL part
        rewards = torch.zeros(len(scores), R)
        rewards[:, -1] = scores
    v = None if valid is None else torch.tensor(valid)
    if v is not None:
        mask = mask * v[:, None]
    return AdvantageInputs(rewards=rewards, scores=scores, mask=mask, group_ids=torch.tensor(groups), valid=v)


def test_grpo_by_hand():
    # group 0: scores 1, 3 -> mean 2, unbiased std sqrt(2); group 1: 0, 0, 6 -> mean 2, std sqrt(12)
    adv, _ = estimate("grpo", inputs([1, 3, 0, 0, 6], [0, 0, 1, 1, 1]), P)
    expect = torch.tensor([-1 / 2**0.5, 1 / 2**0.5, -2 / 12**0.5, -2 / 12**0.5, 4 / 12**0.5])
    torch.testing.assert_close(adv[:, 0], expect, atol=1e-3, rtol=1e-3)
    assert torch.equal(adv[:, 0], adv[:, 2])  # the same advantage on every token


def test_dr_grpo_and_rloo_by_hand():
    x = inputs([1, 3, 0, 0, 6], [0, 0, 1, 1, 1])
    torch.testing.assert_close(estimate("dr_grpo", x, P)[0][:, 0], torch.tensor([-1.0, 1, -2, -2, 4]))
    # RLOO: r_i - mean of the others: 1-3, 3-1, 0-3, 0-3, 6-0
    torch.testing.assert_close(estimate("rloo", x, P)[0][:, 0], torch.tensor([-2.0, 2, -3, -3, 6]))


def test_failed_scores_never_enter_a_baseline():
    # Sample 1 failed (valid False, its placeholder 0). Group 0 keeps 1 and 5: mean 3, not 2.
    x = inputs([1, 0, 5, 2, 9], [0, 0, 0, 1, 1], valid=[True, False, True, True, False])
    for name in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"):
        adv, _ = estimate(name, x, P)
        assert torch.all(adv[1] == 0) and torch.all(adv[4] == 0), name  # failed: no advantage
        assert torch.all(adv[3] == 0), name  # group 1 has one valid sample left: contributes nothing
    torch.testing.assert_close(estimate("dr_grpo", x, P)[0][[0, 2], 0], torch.tensor([-2.0, 2.0]))


def test_reinforce_pp_reward_to_go_with_token_kl_then_global_whitening():
    # Two samples, R = 2, KL part -0.1 per token, score at the last token.
    rewards = torch.tensor([[-0.1, -0.1 + 1.0], [-0.1, -0.1 + 3.0]])
    x = AdvantageInputs(rewards=rewards, scores=torch.tensor([1.0, 3.0]), mask=torch.ones(2, 2))
    adv, _ = estimate("reinforce_pp", x, P)
    togo = torch.tensor([[0.8, 0.9], [2.8, 2.9]])
    expect = (togo - togo.mean()) / togo.std()
    torch.testing.assert_close(adv, expect, atol=1e-4, rtol=1e-4)
    # The baseline variant subtracts the group mean score first: scores -1, +1.
    x = AdvantageInputs(rewards=rewards, scores=torch.tensor([1.0, 3.0]), mask=torch.ones(2, 2),
                        group_ids=torch.tensor([0, 0]))
    adv, _ = estimate("reinforce_pp_baseline", x, P)
    togo = torch.tensor([[-1.2, -1.1], [0.8, 0.9]])
    torch.testing.assert_close(adv, (togo - togo.mean()) / togo.std(), atol=1e-4, rtol=1e-4)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.floats(-5, 5), st.booleans()), min_size=1, max_size=12))
def test_group_baseline_matches_a_plain_loop(rows):
    groups = torch.tensor([g for g, _, _ in rows])
    r = torch.tensor([x for _, x, _ in rows], dtype=torch.float64)
    valid = torch.tensor([v for _, _, v in rows])
    for loo in (False, True):
        baseline, std, usable = group_baseline(r, groups, valid, leave_one_out=loo)
        for i, (g, x, v) in enumerate(rows):
            members = [y for (h, y, w) in rows if h == g and w]
            assert bool(usable[i]) == (v and len(members) >= 2)
            if not usable[i]:
                continue
            others = list(members)
            if loo:
                others.remove(x)
            assert float(baseline[i]) == pytest.approx(sum(others) / len(others), abs=1e-9)
            assert float(std[i]) == pytest.approx(torch.tensor(members, dtype=torch.float64).std().item(), abs=1e-9)


def test_group_stats_counts_zero_std_and_too_small_groups():
    metrics, zero = group_stats(torch.tensor([1.0, 1.0, 0.0, 2.0, 5.0, 0.0]), torch.tensor([0, 0, 1, 1, 2, 2]),
                                torch.tensor([True, True, True, True, True, False]))
    assert zero.tolist() == [True, True, False, False, False, False]
    assert float(metrics["group/zero_std_frac"]) == pytest.approx(1 / 3)
    assert float(metrics["group/too_few_valid_frac"]) == pytest.approx(1 / 3)
    assert float(metrics["group/reward_std"]) == pytest.approx((0 + 2**0.5) / 2)


def test_every_critic_free_estimator_is_registered_without_a_critic():
    assert ESTIMATORS["gae"].needs_critic
    for name in ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"):
        assert not ESTIMATORS[name].needs_critic
