"""Critic-free RL on the tiny real model: GRPO and RLOO (and GRPO with the GSPO and CISPO losses) learn a verifiable task without
degenerate text, build no value head, skip the reference pass at beta 0, and resume exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from alignkit.config import load_config
from alignkit.judge.server import start_judge_server
from alignkit.models.actor_critic import ActorCritic
from alignkit.report import write_report
from alignkit.train import ppo
from alignkit.train.tracking import read_metrics
from tests.conftest import EXAMPLES, crash_after_first_checkpoint

# Verifiable reward: success iff the answer mentions a friend. The SFT model does so in about
# one answer in eight; the word exists in its vocabulary, so the task is learnable.
FRIEND_RULE = "def score(prompt, response, label):\n    return 1.0 if 'friend' in response.lower() else 0.0\n"


@pytest.fixture(scope="module")
def friend_rule(tmp_path_factory):
    path = tmp_path_factory.mktemp("rule") / "friend.py"
    path.write_text(FRIEND_RULE)
    return f"{path}:score"


def grpo_config(model_dir, adapter, out, rule, *overrides):
    return load_config(EXAMPLES / "grpo_tiny.yaml", [
        f"model_name_or_path={model_dir}", f"adapter_name_or_path={adapter}", f"output_dir={out}",
        f"dataset_dir={EXAMPLES / 'data'}", "report_to=none", "plot_loss=false", f"reward_model={rule}",
        *overrides])


@pytest.mark.slow
@pytest.mark.parametrize(("estimator", "loss"), [("grpo", "ppo"), ("rloo", "ppo"), ("grpo", "gspo"), ("grpo", "cispo")])
def test_critic_free_learns_a_verifiable_task(tiny_model_dir, sft_adapter, friend_rule, tmp_path, estimator, loss):
    out = ppo.run(grpo_config(tiny_model_dir, sft_adapter, tmp_path / f"{estimator}_{loss}", friend_rule,
                              f"advantage_estimator={estimator}", f"policy_loss={loss}", "max_steps=40", "seed=0"))
    rows = read_metrics(out)
    first = sum(r["env/reward_mean"] for r in rows[:5]) / 5  # the SFT model's success rate, as sampled
    last = sum(r["env/reward_mean"] for r in rows[-10:]) / 10
    assert last >= min(2 * first, first + 0.3) and last >= first + 0.2, (first, last)
    # ... and not by degenerate text: no length blow-up, no repetition, bounded KL.
    len_first = sum(r["rollout/response_len_mean"] for r in rows[:5]) / 5
    assert max(r["rollout/response_len_mean"] for r in rows[-10:]) <= 2 * len_first
    assert max(r["rollout/repeat_3gram_frac"] for r in rows[-10:]) < 0.2
    assert all(math.isfinite(r["objective/kl"]) and r["objective/kl"] < 20 for r in rows)
    assert "ppo/loss/value" not in rows[-1] and "group/zero_std_frac" in rows[-1]
    # The report adapts: no value-loss check without a critic, a group-signal check instead.
    write_report(out)
    checks = {c["name"]: c["verdict"] for c in json.loads((out / "report" / "health.json").read_text())["checks"]}
    assert "value_loss" not in checks and checks["group_signal"] in ("ok", "warn")


def test_critic_free_builds_no_value_head(tiny_model_dir, sft_adapter, friend_rule, tmp_path):
    args = (tiny_model_dir, sft_adapter, tmp_path / "x", friend_rule)
    grpo = ppo.build_models(grpo_config(*args))
    gae = ppo.build_models(grpo_config(*args, "advantage_estimator=gae", "num_generations=1"))
    hidden = gae.lm.config.hidden_size
    assert grpo.v_head is None
    n_grpo, n_gae = (sum(p.numel() for p in m.trainable_parameters()) for m in (grpo, gae))
    assert n_gae - n_grpo == hidden + 1  # exactly the value head's weight and bias


def test_beta_zero_runs_no_reference_pass_and_saves_no_value_head(tiny_model_dir, sft_adapter, friend_rule, tmp_path,
                                                                monkeypatch):
    def no_reference(*a, **kw):
        raise AssertionError("reference forward pass with beta 0")

    monkeypatch.setattr(ActorCritic, "reference_logits", no_reference)
    out = ppo.run(grpo_config(tiny_model_dir, sft_adapter, tmp_path / "b0", friend_rule, "beta=0", "max_steps=2"))
    rows = read_metrics(out)
    assert [r["objective/kl"] for r in rows] == [0.0, 0.0]
    assert "ppo/loss/kl" not in rows[0]
    assert (out / "adapter_model.safetensors").is_file() and not (out / "value_head.safetensors").exists()


def test_grpo_resume_reproduces_uninterrupted_run(tiny_model_dir, sft_adapter, friend_rule, tmp_path, monkeypatch):
    args = ["max_steps=4", "save_steps=2", "max_new_tokens=10", "per_device_train_batch_size=1",
            "gradient_accumulation_steps=2", "ppo_buffer_size=2", "ppo_epochs=2"]
    full = ppo.run(grpo_config(tiny_model_dir, sft_adapter, tmp_path / "full", friend_rule, *args))

    crash_after_first_checkpoint(lambda: ppo.run(grpo_config(tiny_model_dir, sft_adapter, tmp_path / "cut", friend_rule, *args)), monkeypatch)
    resumed = ppo.run(grpo_config(tiny_model_dir, sft_adapter, tmp_path / "cut", friend_rule, *args,
                                  "resume_from_checkpoint=true"))
    keys = ["env/reward_mean", "objective/kl", "ppo/loss/total", "group/reward_std", "rollout/response_len_mean"]
    a, b = read_metrics(full), read_metrics(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        for k in keys:
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6, nan_ok=True), (k, ra, rb)
    wa, wb = load_file(str(full / "adapter_model.safetensors")), load_file(str(resumed / "adapter_model.safetensors"))
    for k in wa:
        assert wa[k].allclose(wb[k], rtol=1e-4, atol=1e-6), k


@pytest.mark.slow
def test_grpo_against_a_faulty_judge_learns_and_keeps_failures_out_of_baselines(tiny_model_dir, sft_adapter, tmp_path,
                                                                               monkeypatch):
    seen = []  # (advantages, valid) of every step, through the loop's own phase function

    def spy(exp, shaped, estimator, params):
        adv, returns = real(exp, shaped, estimator, params)
        seen.append((adv.detach().clone(), exp.valid.clone()))
        return adv, returns

    real = ppo.loop.advantages
    monkeypatch.setattr(ppo.loop, "advantages", spy)
    with start_judge_server(rule="count_good", fault_rate=0.2, fault_kinds=("500",), seed=0) as judge:
        out = ppo.run(grpo_config(tiny_model_dir, sft_adapter, tmp_path / "judge", "count_good", "reward_model_type=api",
                                  f"reward_model={judge.url_for('alignkit')}", "reward_api.max_retries=0",
                                  "max_failure_rate=1.0", "max_steps=30", "seed=0",
                                  "judge_canaries=false"))  # server faults are compared with step failures
        faults = sum(judge.stats.snapshot()["faults"].values())
    rows = read_metrics(out)
    first = sum(r["env/reward_mean"] for r in rows[:5]) / 5
    last = sum(r["env/reward_mean"] for r in rows[-10:]) / 10
    assert last >= 1.3 * first, (first, last)
    # Identical (prompt, response) pairs share one request, so one fault can fail several samples.
    assert sum(r["reward/failures"] for r in rows) >= faults > 0
    failed = [(adv, valid) for adv, valid in seen if not valid.all()]
    assert failed, "the judge injected faults, so some samples must have failed"
    for adv, valid in failed:  # a failed sample never gets an advantage (test_algos_advantages: nor a baseline)
        assert torch.all(adv[~valid.bool()] == 0)


def test_dynamic_sampling_fills_the_batch_with_informative_groups(tiny_model_dir, sft_adapter, friend_rule, tmp_path):
    # The SFT model mentions a friend about one answer in eight: most groups of 4 score all 0 and
    # carry no GRPO signal. DAPO's dynamic sampling samples more prompts until they are replaced.
    common = ["max_steps=3", "seed=0", "max_new_tokens=12"]
    plain = read_metrics(ppo.run(grpo_config(tiny_model_dir, sft_adapter, tmp_path / "plain", friend_rule, *common)))
    dyn = read_metrics(ppo.run(grpo_config(tiny_model_dir, sft_adapter, tmp_path / "dyn", friend_rule, *common,
                                           "dynamic_sampling=true", "max_sampling_rounds=4")))
    batch = 8 * 4  # prompts x num_generations, grpo_tiny.yaml
    rounds = [r["rollout/sampling_rounds"] for r in dyn]
    assert all(1 <= n <= 4 for n in rounds) and max(rounds) > 1, rounds
    assert [r["rollout/samples"] for r in dyn] == [n * batch for n in rounds]  # every round's samples count
    assert all(r["rollout/samples"] == batch for r in plain)
    zero = lambda rows: sum(r["group/zero_std_frac"] for r in rows) / len(rows)  # noqa: E731
    assert zero(dyn) < zero(plain), (zero(dyn), zero(plain))
    assert dyn[0]["env/reward_mean"] > plain[0]["env/reward_mean"]  # informative groups hold successes
