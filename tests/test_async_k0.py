"""``async_level: 0`` is the loop as it was before asynchronous RL, bit for bit: a fixed-seed tiny
PPO run (with a critic) and a GRPO run log the same metrics and save the same weights as commit
3366d04 did on the same tiny model and SFT adapter (golden values in tests/data/k0_golden.json,
made by tests/k0_runs.py; its docstring says how to remake them), and the hf engine's on-policy
batches carry no importance weight at all (a weight of exactly 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.train import ppo
from tests.k0_runs import fixture_digest, run_one

GOLDEN = json.loads((Path(__file__).parent / "data" / "k0_golden.json").read_text())


@pytest.fixture
def corrections(monkeypatch):
    """Every batch the update trains on: (is_weights, is_mask, behaviour_logprobs, policy_version)."""
    seen = []
    real = ppo.loop.update

    def spy(learner, settings, exp, adv, returns):
        seen.append((exp.is_weights, exp.is_mask, exp.behaviour_logprobs, exp.policy_version))
        return real(learner, settings, exp, adv, returns)

    monkeypatch.setattr(ppo.loop, "update", spy)
    return seen


@pytest.mark.parametrize("name", ["ppo", "grpo"])
def test_async_level_0_equals_the_loop_before_async(tiny_model_dir, sft_adapter, tmp_path, name, corrections):
    if fixture_digest(tiny_model_dir, sft_adapter) != GOLDEN["fixtures"]:
        pytest.fail("the tiny model or SFT adapter the fixtures build changed, so tests/data/k0_golden.json no "
                    "longer applies to them; remake it at commit 3366d04 as tests/k0_runs.py's docstring says")
    got = run_one(name, tiny_model_dir, sft_adapter, tmp_path / name, ("async_level=0",))
    want = GOLDEN[name]
    assert len(got["rows"]) == len(want["rows"])
    for g, w in zip(got["rows"], want["rows"], strict=True):
        # Metrics added since may appear; every metric the old loop logged must be there, unchanged.
        assert {k: g.get(k) for k in w} == w
        assert not any(k.startswith("is/") for k in g)  # no correction applied, none reported
    assert got["weights"] == want["weights"]
    # The hf engine reports no log-probs of its own and each batch is the current policy's: the
    # loss sees no importance weight (exactly 1) and no mask.
    assert [version for *_, version in corrections] == [0, 1]
    assert all(w is None and m is None and b is None for w, m, b, _ in corrections)
