"""openai_judge calibration (JSON scores, G-Eval log-prob scores, several samples), the judge's token
usage and cost, and the tokens-per-minute limit: the client against the judge server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
from pydantic import ValidationError

from alignkit.config import load_config
from alignkit.judge.server import start_judge_server
from alignkit.report import write_report
from alignkit.rewards.api.client import build_api_reward
from alignkit.rewards.api.config import parse_reward_api
from alignkit.rewards.api.limits import TokenBudget
from alignkit.rewards.api.openai_judge import OpenAIJudgePreset
from alignkit.rewards.api.presets import ReplyError
from alignkit.train import ppo
from alignkit.train.tracking import read_metrics
from tests.conftest import EXAMPLES

PROMPTS = ["Say hi.", "Describe the day.", "Rate it.", "One word."]
RESPONSES = ["good", "Good, good day", "not bad", " ".join(["good"] * 10)]


@pytest.fixture(scope="module")
def server():
    with start_judge_server(rule="count_good") as srv:
        yield srv


@pytest.fixture
def judge(server):
    server.stats.reset()
    server.settings.fault_rate, server.settings.fault_first = 0.0, 0
    return server


def reward(judge, **keys):
    cfg = parse_reward_api({"preset": "openai_judge", "url": judge.url_for("openai_judge"), "model": "judge",
                            "max_retries": 0, "score_range": [0, 10], **keys})
    return build_api_reward(cfg)


def score(r, prompts=PROMPTS, responses=RESPONSES):
    async def go():
        try:
            return await r.score(prompts, responses)
        finally:
            await r.aclose()
    return asyncio.run(go())


def test_json_scores_come_from_the_structured_reply(judge):
    r = reward(judge, score_format="json")
    body = r.preset.build([("p", "r", None)])
    schema = body["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["score"]["enum"] == list(range(11)) and schema["required"] == ["score"]
    # The server answers {"score": N} only when asked for JSON; the client reads nothing else in this mode.
    assert [s.value for s in score(r)] == [1.0, 2.0, 0.0, 10.0]


def test_unparseable_json_is_a_failure_not_a_zero():
    preset = OpenAIJudgePreset("judge", "{response}", r"\d+", score_format="json", score_range=(0, 10))
    for content in ("Score: 7", '{"rating": 7}'):
        with pytest.raises(ReplyError) as e:
            preset.parse({"choices": [{"message": {"content": content}}]}, 1)
        assert e.value.kind == "no score"


def test_logprob_scores_are_the_expected_score(judge):
    r = reward(judge, score_from="logprobs")
    assert r.preset.build([("p", "r", None)])["top_logprobs"] == 20
    got = [s.value for s in score(r)]
    # The server puts 60% on the rule's score and 20% on each neighbour; 11 is off the scale and
    # -1 too, so 10 becomes (0.2*9 + 0.6*10) / 0.8 and 0 becomes (0.6*0 + 0.2*1) / 0.8.
    assert got == pytest.approx([1.0, 2.0, 0.25, 9.75])


def test_logprobs_need_a_scale():
    with pytest.raises(ValidationError, match="score_range"):
        parse_reward_api({"preset": "openai_judge", "url": "http://127.0.0.1:1/v1", "model": "j", "score_from": "logprobs"})


def test_judge_samples_are_aggregated_and_their_spread_logged(judge):
    with pytest.raises(ValidationError, match="temperature"):
        reward(judge, judge_samples=3)
    r = reward(judge, judge_samples=3, temperature=0.7)
    assert r.preset.build([("p", "r", None)])["n"] == 3
    assert [s.value for s in score(r)] == [1.0, 2.0, 0.0, 10.0]
    assert r.metrics()["judge/score_std"] == 0.0  # the rule answers alike each time
    # Replies that differ: the median of the numbers, their spread, and the unusable one counted.
    preset = OpenAIJudgePreset("judge", "{response}", r"\d+", judge_samples=3, judge_aggregate="median",
                               temperature=1.0)
    reply = {"choices": [{"message": {"content": c}} for c in ("Score 2", "no idea", "Score 8", "4")]}
    values, logs = preset.parse(reply, 1)
    assert values == [4.0] and logs["judge/unparsed"] == [1]
    assert logs["judge/score_std"] == [pytest.approx(math.sqrt(56 / 9))]  # population std of 2, 8, 4
    with pytest.raises(ReplyError, match="none of 2 judge samples"):
        preset.parse({"choices": [{"message": {"content": "hmm"}}] * 2}, 1)


def test_usage_and_cost_equal_the_servers_totals(judge):
    r = reward(judge, price_per_million=[2.0, 8.0])
    score(r)
    m, usage = r.metrics(), judge.stats.snapshot()["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert m["judge/prompt_tokens"] == usage["prompt_tokens"] and m["judge/completion_tokens"] == usage["completion_tokens"]
    assert m["judge/cost_usd"] == pytest.approx((2 * usage["prompt_tokens"] + 8 * usage["completion_tokens"]) / 1e6)
    assert r.metrics()["judge/prompt_tokens"] == 0  # counts since the last read


def test_token_budget_waits_for_the_minute_to_roll():
    now, slept = [0.0], []

    async def sleep(s):
        slept.append(s)
        now[0] += s

    budget = TokenBudget(100, clock=lambda: now[0], sleep=sleep)

    async def go():
        first = await budget.acquire(30)
        budget.settle(first, 80)  # the reply said 80
        now[0] = 10.0
        await budget.acquire(15)  # 95 <= 100: no wait
        assert not slept
        await budget.acquire(10)  # 105 > 100: waits until the first leaves the window at t=60
        assert now[0] == pytest.approx(60.0) and budget.used() == 25
        await budget.acquire(500)  # alone over the limit: goes once the window is empty
    asyncio.run(go())


@pytest.mark.slow
def test_ppo_metrics_tokens_and_cost_equal_the_servers_usage(tiny_model_dir, tmp_path, judge):
    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps({"prompt": f"Q{i}", "response": "good " * i}) + "\n" for i in range(3)))
    cfg = load_config(EXAMPLES / "ppo_tiny.yaml", [
        f"model_name_or_path={tiny_model_dir}", "adapter_name_or_path=null", f"output_dir={tmp_path / 'run'}",
        f"dataset_dir={EXAMPLES / 'data'}", "report_to=none", "plot_loss=false", "seed=0",
        "per_device_train_batch_size=2", "ppo_buffer_size=2", "ppo_epochs=1", "max_new_tokens=8", "max_steps=3",
        "reward_model_type=api", f"reward_model={judge.url_for('openai_judge')}", "max_failure_rate=1.0",
        "reward_probe_every=2", f"reward_probe={probe}"],  # probe and canaries at steps 1 and 2: logged the step after
        reward_api={"preset": "openai_judge", "model": "judge", "score_range": [0, 10], "normalize": True,
                    "price_per_million": 0.5, "max_tokens_per_minute": 1_000_000, "max_retries": 0})
    out = ppo.run(cfg)
    rows, usage = read_metrics(out), judge.stats.snapshot()["usage"]
    assert any("canary/colon" in r for r in rows) and any("probe/score_mean" in r for r in rows)
    prompt, completion = (sum(r[f"judge/{k}"] for r in rows) for k in ("prompt_tokens", "completion_tokens"))
    assert (prompt, completion) == (usage["prompt_tokens"], usage["completion_tokens"])  # the start-up probe too
    assert sum(r["judge/cost_usd"] for r in rows) == pytest.approx((prompt + completion) * 0.5 / 1e6)
    html = write_report(out).read_text()
    assert f"{prompt:,.0f} / {completion:,.0f}" in html and "judge cost, whole run" in html
    assert json.loads((out / "report" / "health.json").read_text())["verdict"] in ("ok", "warn", "fail")


CRITERIA = [{"name": "accuracy", "weight": 3, "description": "The answer is correct."},
            {"name": "brevity", "weight": 1, "description": "The answer is short."}]


def test_a_rubric_of_weighted_criteria_is_scored_in_one_call(judge):
    r = reward(judge, criteria=CRITERIA)
    body = r.preset.build([("Q?", "A.", None)])
    assert "- accuracy (weight 3): The answer is correct." in body["messages"][0]["content"]
    assert body["response_format"]["json_schema"]["schema"]["required"] == ["accuracy", "brevity"]
    # The server gives every listed criterion the rule's score: the weighted mean is that score.
    assert [s.value for s in score(r)] == [1.0, 2.0, 0.0, 10.0]
    assert judge.stats.snapshot()["requests"] == 4
    m = r.metrics()
    assert m["judge/criterion/accuracy"] == m["judge/criterion/brevity"] == pytest.approx(13 / 4)
    # Different scores per criterion: the weighted mean; a missing or off-scale criterion fails the sample.
    preset = r.preset
    reply = lambda text: {"choices": [{"message": {"content": text}}]}  # noqa: E731
    values, logs = preset.parse(reply('{"accuracy": 8, "brevity": 4}'), 1)
    assert values == [7.0] and logs == {"judge/criterion/accuracy": [8.0], "judge/criterion/brevity": [4.0]}
    for bad, kind in (('{"accuracy": 8}', "no score"), ('{"accuracy": 8, "brevity": 12}', "out of range")):
        with pytest.raises(ReplyError) as e:
            preset.parse(reply(bad), 1)
        assert e.value.kind == kind


def test_criteria_config_errors(judge):
    with pytest.raises(ValidationError, match="unique"):
        reward(judge, criteria=CRITERIA + CRITERIA[:1])
    with pytest.raises(ValidationError, match="criteria"):
        reward(judge, criteria=CRITERIA, rubric="Rate {response}.")
