"""Math units of alignkit.algos: statistics, log-probs, KL, reward shaping, controllers, scores."""

import math

import pytest
import torch

from alignkit.algos import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    entropy_from_logits,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    postprocess_scores,
    selective_log_softmax,
    shape_rewards,
)

X = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, 7.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])
REAL = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)  # X where MASK == 1


# --- masked statistics -------------------------------------------------------------------


def test_masked_mean_ignores_padding():
    assert masked_mean(X, MASK).item() == pytest.approx(2.0)
    assert masked_mean(X, MASK, dim=1).tolist() == pytest.approx([1.5, 3.0])


def test_masked_mean_of_empty_row_is_zero_not_nan():
    assert masked_mean(X, torch.tensor([[1, 0, 0], [0, 0, 0]]), dim=1).tolist() == [1.0, 0.0]


def test_masked_var_matches_torch_var_over_real_tokens():
    assert masked_var(X, MASK).item() == pytest.approx(REAL.var(unbiased=True).item())
    assert masked_var(X, MASK, unbiased=False).item() == pytest.approx(REAL.var(unbiased=False).item())


def test_masked_var_unbiased_needs_two_tokens():
    with pytest.raises(ValueError, match="at least 2 real tokens"):
        masked_var(X, torch.tensor([[1, 0, 0], [0, 0, 0]]))


def test_masked_whiten_normalises_real_tokens_and_zeroes_padding():
    whitened = masked_whiten(X, MASK)
    real = whitened[MASK.bool()]
    expected = (REAL - REAL.mean()) / REAL.std()
    assert real.tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    assert whitened[~MASK.bool()].tolist() == [0.0, 0.0, 0.0]
    # Padding content must not matter.
    assert torch.equal(masked_whiten(X.masked_fill(~MASK.bool(), 1e6), MASK), whitened)


def test_masked_whiten_without_shift_keeps_mean():
    real = masked_whiten(X, MASK, shift_mean=False)[MASK.bool()]
    expected = (REAL - REAL.mean()) / REAL.std() + REAL.mean()
    assert real.tolist() == pytest.approx(expected.tolist(), abs=1e-6)


# --- log-probs and entropy ---------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_logprobs_use_sampling_temperature(temperature):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 3
    tokens = torch.randint(0, 11, (3, 5))
    expected = torch.log_softmax(logits / temperature, -1).gather(-1, tokens[..., None])[..., 0]
    got = logprobs_from_logits(logits, tokens, temperature)
    torch.testing.assert_close(got, expected)
    if temperature != 1.0:
        # The untempered log-probs are a different distribution: the temperature is applied.
        assert not torch.allclose(got, logprobs_from_logits(logits, tokens))


def test_selective_log_softmax_is_temperature_one_and_differentiable():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 7, requires_grad=True)
    tokens = torch.randint(0, 7, (2, 4))
    got = selective_log_softmax(logits, tokens)
    (grad,) = torch.autograd.grad(got.sum(), logits)
    expected = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    (expected_grad,) = torch.autograd.grad(expected.sum(), logits)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(grad, expected_grad)


def test_bf16_logits_give_float32_logprobs_of_the_bf16_values():
    torch.manual_seed(2)
    logits = (torch.randn(2, 3, 50) * 5).to(torch.bfloat16)
    tokens = torch.randint(0, 50, (2, 3))
    got = logprobs_from_logits(logits, tokens, temperature=0.9)
    assert got.dtype == torch.float32
    expected = torch.log_softmax(logits.float() / 0.9, -1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(got, expected)


def test_entropy_matches_hand_computation_and_temperature():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [2.0, 1.0, 0.0, -1.0]]])  # (1, 2, 4)
    got = entropy_from_logits(logits, temperature=0.5)
    p = [math.exp(v / 0.5) for v in (2.0, 1.0, 0.0, -1.0)]
    p = [v / sum(p) for v in p]
    expected = [math.log(4), -sum(v * math.log(v) for v in p)]
    assert got.shape == (1, 2)
    assert got[0].tolist() == pytest.approx(expected, rel=1e-5)
    # A lower temperature sharpens a non-uniform distribution.
    assert got[0, 1] < entropy_from_logits(logits)[0, 1]


def test_non_positive_temperature_is_an_error():
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.long), 0.0)


# --- KL ----------------------------------------------------------------------------------

LOGP = torch.tensor([[-1.0, -2.0]])
REF_LOGP = torch.tensor([[-1.5, -1.0]])


@pytest.mark.parametrize(
    ("kind", "expected"), [("kl", [0.5, -1.0]), ("abs", [0.5, 1.0]), ("mse", [0.125, 0.5])]
)
def test_sample_kl_estimators(kind, expected):
    assert kl_penalty(LOGP, REF_LOGP, kind)[0].tolist() == pytest.approx(expected)


def test_full_kl_equals_sum_p_log_p_over_q():
    logits = torch.tensor([[[1.0, 0.0, -1.0], [0.3, 0.3, 0.3]]])
    ref_logits = torch.tensor([[[0.0, 0.5, 0.2], [2.0, -1.0, 0.0]]])
    expected = []
    for row, ref_row in zip(logits[0].tolist(), ref_logits[0].tolist(), strict=True):
        p = [math.exp(v / 0.8) for v in row]
        q = [math.exp(v / 0.8) for v in ref_row]
        p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
        expected.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True)))
    got = kl_penalty(LOGP, REF_LOGP, "full", logits, ref_logits, temperature=0.8)
    assert got[0].tolist() == pytest.approx(expected, rel=1e-5)
    assert kl_penalty(LOGP, REF_LOGP, "full", logits, logits)[0].tolist() == pytest.approx([0, 0], abs=1e-6)


def test_kl_errors_name_the_fix():
    with pytest.raises(ValueError, match="kl, abs, mse, full"):
        kl_penalty(LOGP, REF_LOGP, "k3")
    with pytest.raises(ValueError, match="ref_logits"):
        kl_penalty(LOGP, REF_LOGP, "full")


# --- reward shaping ----------------------------------------------------------------------

WORKED_KL = [1.2, 0.5, 2.3, 3.6, 4.8, 1.5, 4.5, 1.0, 5.3, 2.1]
WORKED_REWARDS = [-0.24, -0.1, -0.46, -0.72, -0.96, -0.3, -0.9, -0.2, -1.06, 3.38]


def test_shape_rewards_worked_example_with_right_padding():
    # Row 0 is the worked example; row 1 is 4 tokens long, padded with garbage log-probs.
    logprobs = torch.full((2, 12), -0.5, dtype=torch.float64)
    ref_logprobs = logprobs.clone()
    ref_logprobs[0, :10] -= torch.tensor(WORKED_KL, dtype=torch.float64)  # k1 = WORKED_KL
    ref_logprobs[1, :4] -= 1.0
    ref_logprobs[1, 4:] = -30.0
    mask = torch.zeros(2, 12, dtype=torch.long)
    mask[0, :10], mask[1, :4] = 1, 1
    scores = torch.tensor([3.8, -1.0], dtype=torch.float64)

    kl = kl_penalty(logprobs, ref_logprobs, "kl") * mask  # the loop's per-token k1 estimate, zero on padding
    rewards, non_score_reward = shape_rewards(scores, kl, mask, kl_coef=0.2)

    assert rewards[0].tolist() == pytest.approx(WORKED_REWARDS + [0, 0])
    assert rewards[1].tolist() == pytest.approx([-0.2, -0.2, -0.2, -1.2] + [0] * 8)
    assert kl[0].tolist() == pytest.approx(WORKED_KL + [0, 0])
    torch.testing.assert_close(non_score_reward, -0.2 * kl)


def test_shape_rewards_rejects_empty_response():
    z = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="at least one real token"):
        shape_rewards(torch.zeros(1), z, z, kl_coef=0.1)


# --- KL controllers ----------------------------------------------------------------------


def test_adaptive_kl_controller_follows_ziegler():
    above, below, near = (AdaptiveKLController(0.2, target=6.0, horizon=10000) for _ in range(3))
    above.update(12.0, n_steps=256)  # error 1.0 clipped to 0.2
    below.update(3.0, n_steps=256)  # error -0.5 clipped to -0.2
    near.update(6.6, n_steps=256)  # error 0.1, unclipped
    assert above.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))
    assert below.value == pytest.approx(0.2 * (1 - 0.2 * 256 / 10000))
    assert near.value == pytest.approx(0.2 * (1 + 0.1 * 256 / 10000))
    assert below.value < 0.2 < near.value < above.value


def test_fixed_kl_controller_never_moves():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, n_steps=64)
    assert ctl.value == 0.05


def test_kl_controller_state_dict_round_trip():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    for kl in (9.0, 7.0, 2.0):
        ctl.update(kl, n_steps=64)
    restored = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value != 0.1
    ctl.update(8.0, 64)
    restored.update(8.0, 64)
    assert restored.value == ctl.value


# --- score post-processing ---------------------------------------------------------------


def test_running_moments_equal_statistics_of_concatenated_batches():
    torch.manual_seed(3)
    batches = [torch.randn(5) * 2 + 1, torch.randn(1) - 4, torch.randn(17) * 0.5]
    moments = RunningMoments()
    for batch in batches:
        moments.update(batch)
    everything = torch.cat(batches).double()
    assert moments.count == 23
    assert moments.mean == pytest.approx(everything.mean().item())
    assert moments.std == pytest.approx(everything.std().item())


def test_running_moments_state_dict_round_trip():
    moments = RunningMoments()
    moments.update(torch.tensor([1.0, 5.0, 2.0]))
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    for m in (moments, restored):
        m.update(torch.tensor([0.5, -3.0]))
    assert restored.state_dict() == moments.state_dict()
    assert restored.count == 5


def test_missing_eos_penalty_and_clip():
    scores = torch.tensor([1.0, 2.0, 3.0, -9.0])
    no_eos = torch.tensor([False, True, False, False])
    out = postprocess_scores(scores, no_eos, missing_eos_penalty=1.5, score_clip=2.5)
    assert out.tolist() == [1.0, 0.5, 2.5, -2.5]
    assert scores.tolist() == [1.0, 2.0, 3.0, -9.0]  # input untouched


def test_score_normalisation_updates_moments_first_with_penalised_scores():
    moments = RunningMoments()
    no_eos = torch.tensor([False, False, True])
    first = postprocess_scores(
        torch.tensor([1.0, 2.0, 4.0]), no_eos, missing_eos_penalty=1.0, moments=moments
    )
    # Penalised batch is [1, 2, 3]: mean 2, std 1.
    assert first.tolist() == pytest.approx([-1.0, 0.0, 1.0])
    second = postprocess_scores(torch.tensor([6.0]), torch.tensor([False]), moments=moments)
    seen = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert second.item() == pytest.approx(((6.0 - seen.mean()) / seen.std()).item(), rel=1e-5)
