"""The reward service the trainer scores with: failure policy, wrappers for every source kind,
and ScoredBatch from a real local judge server."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch

from alignkit.config import load_config
from alignkit.judge.server import start_judge_server
from alignkit.models.actor_critic import build_actor_critic
from alignkit.models.loading import load_causal_lm, load_tokenizer
from alignkit.models.reward_model import RewardModel, save_reward_model
from alignkit.rewards.api.client import RewardApiError
from alignkit.rewards.base import Score, ScoreMeta
from alignkit.rewards.failures import FailurePolicy, RewardFailureError
from alignkit.rewards.model import ModelReward
from alignkit.rewards.rules import count_good
from alignkit.rewards.service import RewardService, build_reward_service
from alignkit.rewards.spec import RewardContext, RewardSpec

PROMPTS = ["Say hi.", "Describe the day.", "Rate it.", "One word."]
RESPONSES = ["good", "Good, good day", "not bad", "goodness"]
SCORES = [Score(1.0), Score.failure("HTTP 500: boom"), Score(0.5), Score.failure("timeout: 2 s")]


# -- failure policy ----------------------------------------------------------------------


def test_failure_policy_skip_zero_fail_and_rate():
    values, valid, n_failed = FailurePolicy("skip", 0.5).apply(SCORES)  # 50% is not above 0.5
    assert (values, valid, n_failed) == ([1.0, 0.0, 0.5, 0.0], [True, False, True, False], 2)
    values, valid, _ = FailurePolicy("zero", 0.5).apply(SCORES)
    assert (values, valid) == ([1.0, 0.0, 0.5, 0.0], [True] * 4)
    with pytest.raises(RewardFailureError) as err:
        FailurePolicy("fail", 1.0).apply(SCORES)
    # The newest distinct reasons first; the keys are named as the user sets them, for any source.
    assert str(err.value) == "2 of 4 scores failed and on_failure is 'fail'; last reasons: timeout: 2 s; HTTP 500: boom"
    with pytest.raises(RewardFailureError) as err:
        FailurePolicy("zero", 0.25).apply(SCORES)
    assert str(err.value).startswith("2 of 4 scores failed (50%), above max_failure_rate=0.25; last reasons: timeout")
    assert "reward_api" not in str(err.value)
    assert FailurePolicy("fail", 0.0).apply([Score(2.0)]) == ([2.0], [True], 0)
    assert FailurePolicy("skip", 0.0).apply([]) == ([], [], 0)
    with pytest.raises(ValueError, match="skip, zero or fail"):
        FailurePolicy("ignore", 0.5)  # type: ignore[arg-type]


# -- the same wrappers for every kind of source ------------------------------------------


@pytest.fixture(scope="module")
def nan_reward_model(tiny_model_dir, tmp_path_factory):
    """A full reward model on disk whose score head is NaN: every score it gives is non-finite."""
    rm = RewardModel.from_causal_lm(load_causal_lm(str(tiny_model_dir)))
    with torch.no_grad():
        rm.score.weight.fill_(float("nan"))
    out = tmp_path_factory.mktemp("rm") / "nan_head"
    save_reward_model(rm, out, load_tokenizer(str(tiny_model_dir)), {"template": "chatml"})
    return out


@pytest.fixture(scope="module")
def nan_judge():
    with start_judge_server(fault_rate=1.0, fault_kinds=("nan",)) as judge:
        yield judge


def nan_spec(kind: str, tmp_path, nan_reward_model, nan_judge) -> RewardSpec:
    """A source of kind ``kind`` whose every score is NaN, and a policy that lets all fail."""
    if kind == "rule":
        rule = tmp_path / "rules.py"
        rule.write_text("def nan(prompt, response, label):\n    return float('nan')\n")
        source = {"reward_model": f"{rule}:nan"}
    elif kind == "full":
        source = {"reward_model": str(nan_reward_model)}
    else:
        source = {"reward_model": nan_judge.url_for("alignkit"), "reward_api": {"max_retries": 0, "health_check": False}}
    return RewardSpec(reward_model_type=kind, max_failure_rate=1.0, **source)


@pytest.mark.parametrize("kind", ["rule", "full", "api"])
def test_failures_are_counted_the_same_for_every_source(kind, tmp_path, nan_reward_model, nan_judge, caplog):
    spec = nan_spec(kind, tmp_path, nan_reward_model, nan_judge)
    service = build_reward_service(spec, RewardContext(cutoff_len=64))
    try:
        service.start()
        with caplog.at_level(logging.WARNING, logger="alignkit.rewards.wrappers"):
            batch = service.collect([service.submit(PROMPTS, RESPONSES, ScoreMeta())])
    finally:
        service.close()
    assert batch.n_failed == 4 and batch.valid == [False] * 4 and batch.values == [0.0] * 4
    assert batch.metrics["reward/failures"] == 4
    assert service.failure_summary() == {"non-finite score": 4}
    assert "4 of 4 scores failed; last: non-finite score" in caplog.text


def test_think_stripping_and_cache_wrap_a_rule(tmp_path):
    spec = RewardSpec(reward_model="count_good", strip_think=True, think_truncated="fail",
                      reward_cache=str(tmp_path / "scores.sqlite"))
    responses = ["<think>good good</think> good", "<think>good good", "no thought", "good good"]
    for attempt in range(2):  # the second service (a restarted run) reads the first one's scores
        service = build_reward_service(spec, RewardContext())
        try:
            batch = service.collect([service.submit(PROMPTS, responses, ScoreMeta())])
        finally:
            service.close()
        assert batch.values == [1.0, 0.0, 0.0, 2.0] and batch.valid == [True, False, True, True]
        assert batch.metrics["rollout/think_truncated_frac"] == 0.25
        assert batch.metrics["reward/cache_hits"] == 3 * attempt  # the failed one is never cached
        assert service.failure_summary() == {"think truncated": 1}


def test_lora_reward_model_on_the_actor_critic(tiny_model_dir, tmp_path):
    def ppo_config(reward_model):
        return load_config(None, ["stage=ppo", f"model_name_or_path={tiny_model_dir}", "dataset=unused",
                                  f"output_dir={tmp_path / 'run'}", "template=chatml", "cutoff_len=64",
                                  "reward_model_type=lora", f"reward_model={reward_model}"])

    # A LoRA reward model on the same base, with an adapter that changes the base's outputs.
    rm_lm = build_actor_critic(load_causal_lm(str(tiny_model_dir)), ppo_config("unused")).lm
    with torch.no_grad():
        for name, param in rm_lm.named_parameters():
            if "lora_B" in name:
                param.add_(0.05)
    rm_dir = tmp_path / "rm"
    save_reward_model(RewardModel.from_causal_lm(rm_lm), rm_dir, load_tokenizer(str(tiny_model_dir)),
                      {"base_model": str(tiny_model_dir), "template": "chatml"})

    cfg = ppo_config(rm_dir)
    ac = build_actor_critic(load_causal_lm(str(tiny_model_dir)), cfg)
    service = build_reward_service(cfg, cfg.reward_context(), policy_model=ac)
    try:
        service.start()
        batch = service.collect([service.submit(PROMPTS, RESPONSES, ScoreMeta())])
    finally:
        service.close()
    alone = asyncio.run(ModelReward.from_dir(rm_dir).score(PROMPTS, RESPONSES))
    assert batch.valid == [True] * 4 and len(set(batch.values)) == 4
    torch.testing.assert_close(torch.tensor(batch.values), torch.tensor([s.value for s in alone]))
    assert ac.lm.active_adapter == "default"  # the policy's adapter is back


# -- ScoredBatch from a real judge -------------------------------------------------------


def judge_service(judge, **spec) -> RewardService:
    api = {"max_retries": 0, "max_concurrency": 4, **spec.pop("reward_api", {})}
    return build_reward_service(
        RewardSpec(reward_model_type="api", reward_model=judge.url_for("alignkit"), reward_api=api, **spec),
        RewardContext(),
    )


def test_scored_batch_from_a_judge_with_faults():
    prompts = [f"Prompt {i}." for i in range(24)]
    responses = [" ".join(["good"] * (i % 4)) or "nothing" for i in range(24)]
    with start_judge_server(fault_kinds=("500", "malformed"), seed=3) as judge:
        service = judge_service(judge, max_failure_rate=0.9, include_special_tokens=True)
        try:
            service.start()
            judge.settings.fault_rate = 0.3  # after the start-up probe, which must pass
            # Three chunks submitted one after another, as the trainer does after each rollout chunk.
            futures = [service.submit(prompts[c : c + 8], responses[c : c + 8], ScoreMeta()) for c in (0, 8, 16)]
            batch = service.collect(futures)
        finally:
            service.close()
            service.close()  # idempotent
        faults = judge.stats.snapshot()["faults"]
    assert service.include_special_tokens
    assert 0 < batch.n_failed == sum(faults.values()) < 24
    assert batch.n_failed == batch.valid.count(False) == batch.metrics["reward/failures"]
    # In submission order, every valid value is the judge's count_good; failures are never 0s in disguise.
    for value, ok, response in zip(batch.values, batch.valid, responses, strict=True):
        assert value == (count_good("", response, None) if ok else 0.0)
    assert batch.metrics["reward/requests"] == 24 and batch.metrics["reward/latency_p50"] > 0
    assert sum(service.failure_summary().values()) == batch.n_failed
    # Each failed sample says why (what samples.jsonl shows); a valid one has no reason.
    assert [r is None for r in batch.reasons] == batch.valid
    assert {r.split(":", 1)[0] for r in batch.reasons if r is not None} <= {"HTTP 500", "malformed JSON"}
    assert set(service.failure_summary()) <= {"HTTP 500", "malformed JSON"}


def test_too_many_failures_stop_and_health_check_is_the_services():
    with start_judge_server(fault_rate=1.0, fault_kinds=("500",)) as judge:
        service = judge_service(judge, reward_api={"health_check": False})
        try:
            service.start()  # disabled: nothing is sent
            assert judge.stats.snapshot()["requests"] == 0
            future = service.submit(PROMPTS, RESPONSES, ScoreMeta())
            with pytest.raises(RewardFailureError, match=r"4 of 4 scores failed \(100%\), above max_failure_rate=0.5"):
                service.collect([future])
        finally:
            service.close()
        service = judge_service(judge)
        try:
            with pytest.raises(RewardApiError, match="start-up check failed: HTTP 500"):
                service.start()
        finally:
            service.close()


# -- thoughts and strip_think --------------------------------------------------------------

PPO_RULE = ["stage=ppo", "model_name_or_path=/m", "dataset=a", "output_dir=/o", "reward_model=count_good"]


@pytest.mark.parametrize(("template", "extra", "expected"), [
    ("qwen3", [], True), ("qwen3_vl", [], True), ("qwen3_nothink", [], False), ("chatml", [], False),
    ("qwen3", ["strip_think=false"], False), ("chatml", ["strip_think=true"], True),
])
def test_a_thinking_template_turns_strip_think_on_by_default(template, extra, expected):
    assert load_config(None, [*PPO_RULE, f"template={template}", *extra]).strip_think is expected


def test_thoughts_reaching_the_judge_are_warned_about_once(tiny_model_dir, caplog):
    tok = load_tokenizer(str(tiny_model_dir))
    rows = [tok.encode("<think>count</think>good", add_special_tokens=False), tok.encode("good")]
    assert tok.convert_tokens_to_ids("<think>") in rows[0]  # a special token: dropped from the judged text
    service = build_reward_service(RewardSpec(reward_model="count_good", strip_think=False), RewardContext())
    try:
        with caplog.at_level(logging.WARNING, logger="alignkit.rewards.service"):
            assert service.response_texts(tok, rows) == ["countgood", "good"]  # the thought, without its tags
            service.response_texts(tok, rows)
    finally:
        service.close()
    warnings = [r.getMessage() for r in caplog.records if "strip_think is off" in r.getMessage()]
    assert len(warnings) == 1 and "strip_think: true" in warnings[0]
    quiet = build_reward_service(RewardSpec(reward_model="count_good", strip_think=True), RewardContext())
    try:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="alignkit.rewards.service"):
            assert quiet.response_texts(tok, rows) == ["<think>count</think>good", "good"]  # tags kept to strip
    finally:
        quiet.close()
    assert not caplog.records
