"""PPO on the tiny real model with a rule reward: it learns, resumes exactly, saves cleanly."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from alignkit.train import ppo
from alignkit.train.tracking import read_metrics
from tests.conftest import crash_after_first_checkpoint, ppo_config


@pytest.mark.slow
def test_ppo_learns_rule_reward(tiny_model_dir, sft_adapter, tmp_path):
    out = ppo.run(ppo_config(tiny_model_dir, sft_adapter, tmp_path / "ppo", "max_steps=30", "seed=0"))
    rows = read_metrics(out)
    rewards = [r["env/reward_mean"] for r in rows]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last >= 2 * first, (first, last)
    assert all(math.isfinite(r["objective/kl"]) for r in rows)
    # The policy starts as the SFT model, which is also the reference: no KL at the first step.
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert (out / "adapter_model.safetensors").is_file() and (out / "value_head.safetensors").is_file()
    assert not any("v_head" in k or "summary" in k for k in load_file(str(out / "adapter_model.safetensors")))


def test_ppo_resume_reproduces_uninterrupted_run(tiny_model_dir, sft_adapter, tmp_path, monkeypatch):
    args = ["max_steps=4", "save_steps=2", "max_new_tokens=12", "ppo_buffer_size=2", "ppo_epochs=2",
            "ppo_score_norm=true", "adap_kl_ctrl=true"]
    full = ppo.run(ppo_config(tiny_model_dir, sft_adapter, tmp_path / "full", *args))

    crash_after_first_checkpoint(lambda: ppo.run(ppo_config(tiny_model_dir, sft_adapter, tmp_path / "cut", *args)), monkeypatch)
    resumed = ppo.run(ppo_config(tiny_model_dir, sft_adapter, tmp_path / "cut", *args, "resume_from_checkpoint=true"))

    keys = ["env/reward_mean", "objective/kl", "objective/kl_coef", "ppo/loss/total", "ppo/mean_scores"]
    a = [{k: r[k] for k in keys} for r in read_metrics(full)]
    b = [{k: r[k] for k in keys} for r in read_metrics(resumed)]
    assert [r["step"] for r in read_metrics(resumed)] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        for k in keys:
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), (k, ra, rb)
    wa, wb = load_file(str(full / "value_head.safetensors")), load_file(str(resumed / "value_head.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


def test_failed_scores_are_masked_not_zeroed(tiny_model_dir, sft_adapter, tmp_path):
    rule = tmp_path / "flaky.py"
    # Fails on every response without the letter 'o'; the rest score 1.
    rule.write_text("def score(prompt, response, label):\n    if 'o' not in response:\n"
                    "        raise ValueError('no o')\n    return 1.0\n")
    out = ppo.run(ppo_config(tiny_model_dir, sft_adapter, tmp_path / "flaky", "max_steps=2", "max_new_tokens=8",
                             f"reward_model={rule}:score", "max_failure_rate=1.0"))
    rows = read_metrics(out)
    assert all(r["env/reward_mean"] == 1.0 for r in rows)  # failures did not drag the mean toward 0
    assert sum(r["reward/failures"] for r in rows) > 0


@pytest.mark.parametrize("variant", [
    ["critic_adapter=true"],  # the critic gets its own LoRA adapter
    ["finetuning_type=full", "learning_rate=1e-5"],  # separate policy and frozen reference copies
    ["kl_penalty=full", "top_k=20", "top_p=0.9", "temperature=0.7", "ent_coef=0.01"],
])
def test_ppo_variants_train(tiny_model_dir, sft_adapter, tmp_path, variant):
    out = ppo.run(ppo_config(tiny_model_dir, sft_adapter, tmp_path / "v", "max_steps=2", "max_new_tokens=8",
                             "ppo_buffer_size=2", "ppo_epochs=1", *variant))
    rows = read_metrics(out)
    assert len(rows) == 2 and all(math.isfinite(r["ppo/loss/total"]) for r in rows)
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)  # policy starts as the reference
    assert rows[1]["ppo/policy/approxkl"] >= 0
    if "critic_adapter=true" in variant:
        assert not any("critic" in k for k in load_file(str(out / "adapter_model.safetensors")))
        critic = load_file(str(out / "critic_adapter" / "critic" / "adapter_model.safetensors"))
        # lora_B starts at zero: non-zero means the critic adapter received gradients and trained.
        assert max(float(v.abs().max()) for k, v in critic.items() if "lora_B" in k) > 0
    if "finetuning_type=full" in variant:
        assert (out / "model.safetensors").is_file() or (out / "model.safetensors.index.json").is_file()
        # The policy trained, not only the value head: the base the SFT adapter was merged into is
        # not left frozen (the frozen reference copy scores exactly the same until it moves).
        assert rows[1]["objective/kl"] != 0.0
