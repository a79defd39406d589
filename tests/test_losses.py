"""Policy losses of the registry against hand-computed numbers: values, gradients and stats."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.algos.losses import LOSS_ALIASES, POLICY_LOSSES, LossInputs, compute_policy_loss


def inputs(ratios, advantages, mask, low=0.2, high=0.2, mode="token_mean", weights=None):
    ratios = torch.tensor(ratios, dtype=torch.float64)
    old = torch.full_like(ratios, -2.0)
    logp = (old + ratios.log()).requires_grad_()
    adv = torch.tensor(advantages, dtype=torch.float64)[:, None].expand_as(ratios)
    return LossInputs(logp, old, adv, torch.tensor(mask, dtype=torch.float64), low, high, mode, weights=weights)


def test_gspo_clips_the_sequence_ratio_and_spreads_its_gradient_over_tokens():
    # Row 0: A = +1, token ratios 1.5, 1.5 -> sequence ratio 1.5, clipped to 1.2 (no gradient).
    # Row 1: A = -1, token ratios 2 and 0.5 -> geometric mean 1: not clipped, loss +1.
    # The third column is padding with a wild ratio that must not count.
    x = inputs([[1.5, 1.5, 9.0], [2.0, 0.5, 9.0]], [1.0, -1.0], [[1, 1, 0], [1, 1, 0]], mode="seq_mean_token_mean")
    loss, stats = compute_policy_loss("gspo", x)
    loss.backward()
    assert loss.item() == pytest.approx((-1.2 + 1.0) / 2)
    assert stats["clipfrac"].item() == pytest.approx(0.5)  # one response of two
    # d loss / d logp_t = -A * s_i / |y_i| / n_seqs: 0 on the clipped row, 1 * 1 / 2 / 2 on row 1.
    torch.testing.assert_close(x.logprobs.grad, torch.tensor([[0, 0, 0], [0.25, 0.25, 0]], dtype=torch.float64))


def test_gspo_equals_token_ppo_when_every_response_has_one_token():
    x = inputs([[1.5], [0.7], [1.1]], [1.0, -1.0, 2.0], [[1], [1], [1]])
    gspo, _ = compute_policy_loss("gspo", x)
    ppo, _ = compute_policy_loss("ppo", x)
    assert gspo.item() == pytest.approx(ppo.item())


def test_cispo_caps_the_weight_but_keeps_every_token_gradient():
    # A = +1, ratios 0.5, 1, 2 with no lower bound (low 1.0) and high 0.28 -> weights 0.5, 1, 1.28.
    x = inputs([[0.5, 1.0, 2.0]], [1.0], [[1, 1, 1]], low=1.0, high=0.28)
    loss, stats = compute_policy_loss("cispo", x)
    loss.backward()
    logp = [-2 + math.log(0.5), -2.0, -2 + math.log(2.0)]
    assert loss.item() == pytest.approx(-(0.5 * logp[0] + 1.0 * logp[1] + 1.28 * logp[2]) / 3)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    # The clipped token still learns (PPO would give it 0): gradient -w * A / n.
    torch.testing.assert_close(x.logprobs.grad, torch.tensor([[-0.5, -1.0, -1.28]], dtype=torch.float64) / 3)


def test_ppo_clip_matches_the_hand_computed_example_and_weights_scale_it():
    x = inputs([[0.5, 1.0, 1.1, 1.5], [0.5, 1.5, 3.0, 3.0]], [1.0, -1.0], [[1, 1, 1, 1], [1, 1, 0, 0]])
    loss, stats = compute_policy_loss("ppo", x)
    assert loss.item() == pytest.approx((-0.5 - 1.0 - 1.1 - 1.2 + 0.8 + 1.5) / 6)
    assert stats["clipfrac"].item() == pytest.approx(2 / 6)
    halved = inputs([[0.5, 1.0, 1.1, 1.5], [0.5, 1.5, 3.0, 3.0]], [1.0, -1.0], [[1, 1, 1, 1], [1, 1, 0, 0]],
                    weights=torch.full((2, 4), 0.5, dtype=torch.float64))
    assert compute_policy_loss("ppo", halved)[0].item() == pytest.approx(loss.item() / 2)


def test_specs_carry_defaults_and_aliases_point_at_registered_losses():
    assert POLICY_LOSSES["gspo"].cliprange_low == pytest.approx(3e-4)
    assert POLICY_LOSSES["gspo"].loss_agg_mode == "seq_mean_token_mean"
    assert POLICY_LOSSES["cispo"].cliprange_low == 1.0
    assert LOSS_ALIASES["vanilla"] == "ppo"
    assert all(target in POLICY_LOSSES for target in LOSS_ALIASES.values())
    with pytest.raises(KeyError, match="registered: cispo, gspo, ppo"):
        compute_policy_loss("nope", inputs([[1.0]], [1.0], [[1]]))


def test_truncated_and_masked_importance_weights_by_hand():
    from alignkit.algos.correction import importance_weights

    # Token ratios pi_prox / pi_behaviour: 0.25, 1, 3 (and padding with a wild ratio).
    behaviour = torch.full((1, 4), -2.0, dtype=torch.float64)
    prox = behaviour + torch.tensor([[0.25, 1.0, 3.0, 50.0]], dtype=torch.float64).log()
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.float64)
    w, keep, stats = importance_weights(prox, behaviour, mask, "tis", cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[0.25, 1.0, 2.0, 0.0]], dtype=torch.float64))  # min(w, C)
    assert keep[mask.bool()].eq(1).all()
    assert stats["is/ratio_mean"].item() == pytest.approx((0.25 + 1 + 3) / 3)
    assert stats["is/clipped_frac"].item() == pytest.approx(1 / 3)
    w, keep, stats = importance_weights(prox, behaviour, mask, "mis", cap=2.0, low=0.5)
    torch.testing.assert_close(w, torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=torch.float64))  # outside [0.5, 2]
    assert keep[0, :3].tolist() == [0.0, 1.0, 0.0] and stats["is/masked_frac"].item() == pytest.approx(2 / 3)
    # Sequence level: one geometric-mean ratio, (0.25 * 1 * 3) ** (1/3) ~ 0.909, inside the band.
    w, keep, _ = importance_weights(prox, behaviour, mask, "mis", cap=2.0, low=0.5, level="sequence")
    assert w[0, :3].tolist() == pytest.approx([0.75 ** (1 / 3)] * 3) and keep[0, :3].eq(1).all()


def test_on_policy_samples_get_a_weight_of_exactly_one():
    from alignkit.algos.correction import importance_weights

    logp = torch.randn(3, 5)
    w, keep, stats = importance_weights(logp, logp.clone(), torch.ones(3, 5), "tis")
    assert torch.equal(w, torch.ones(3, 5)) and torch.equal(keep, torch.ones(3, 5))
    assert stats["is/ratio_mean"].item() == 1.0
