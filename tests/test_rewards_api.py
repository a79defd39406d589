"""The HTTP judge client against the real judge server on 127.0.0.1 (no mocks)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from alignkit.judge.server import JudgeSettings, start_judge_server
from alignkit.rewards.api.client import ApiReward, RewardApiError, build_api_reward
from alignkit.rewards.api.config import ApiSettings, parse_reward_api
from alignkit.rewards.api.presets import ReplyError, parse_path, resolve
from alignkit.rewards.base import RewardSource, Score, ScoreMeta
from alignkit.rewards.factory import build_reward_source
from alignkit.rewards.runner import BackgroundScorer
from alignkit.rewards.spec import RewardContext, RewardSpec
from alignkit.rewards.text import strip_think, think_truncated_frac
from alignkit.rewards.wrappers import CountFailures

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PROMPTS = ["Say hi.", "Describe the day.", "Rate it.", "One word."]
RESPONSES = ["good", "Good, good day", "not bad", "goodness"]
EXPECTED = [1.0, 2.0, 0.0, 0.0]  # count_good: whole word, any case
SECRET = "s3cr3t-Judge-Token-0042"


@pytest.fixture(scope="module")
def server():
    srv = start_judge_server()
    yield srv
    srv.stop()


@pytest.fixture
def judge(server):
    """The shared server with default knobs and zeroed counters for each test."""
    for f in dataclasses.fields(JudgeSettings):
        setattr(server.settings, f.name, f.default)
    server.stats.reset()
    return server


@pytest.fixture
def fresh_judge():
    """A server of its own, for tests that count requests in flight (the shared server may
    still hold replies hung by an earlier test's injected timeouts)."""
    srv = start_judge_server()
    yield srv
    srv.stop()


def api_keys(judge, preset: str = "alignkit", **kw) -> dict:
    kw = {"timeout_s": 2.0, "max_retries": 0, "backoff": 0.01, **kw}
    if preset == "openai_judge":
        kw.setdefault("model", "judge")
    return {"preset": preset, "url": judge.url_for(preset), **kw}


def make(judge, preset: str = "alignkit", **kw) -> ApiReward:
    """The bare judge client (no wrappers)."""
    return build_api_reward(parse_reward_api(api_keys(judge, preset, **kw)))


def make_source(judge, spec: dict | None = None, **kw) -> RewardSource:
    """The judge as ``build_reward_source`` builds it: failure counts, think stripping, cache."""
    spec = RewardSpec(reward_model_type="api", reward_api=api_keys(judge, **kw), **(spec or {}))
    return build_reward_source(spec, RewardContext())


def score(reward: RewardSource, prompts=PROMPTS, responses=RESPONSES, labels=None) -> list[Score]:
    async def go():
        try:
            return await reward.score(prompts, responses, ScoreMeta(labels=labels))
        finally:
            await reward.aclose()

    return asyncio.run(go())


def values(scores: list[Score]) -> list[float | None]:
    return [s.value for s in scores]


def load_example(name: str, judge, **kw) -> ApiSettings:
    raw = yaml.safe_load((EXAMPLES / name).read_text())["reward_api"]
    raw.update(url=judge.url_for("custom"), cache=None, timeout_s=2.0, **kw)
    return RewardSpec(reward_model_type="api", reward_api=raw).api_settings()


# -- presets -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "batch_size"),
    [("alignkit", 3), ("alignkit", 1), ("openrlhf", 2), ("openai_judge", 1), ("llamafactory", 4)],
)
def test_each_preset_round_trips(judge, preset, batch_size):
    scores = score(make(judge, preset, batch_size=batch_size), labels=["a", None, "c", None])
    assert values(scores) == EXPECTED
    stats = judge.stats.snapshot()
    assert stats["requests"] == -(-len(PROMPTS) // batch_size)
    assert stats["items"] == len(PROMPTS)
    if preset != "llamafactory":  # llamafactory sends prompt+response joined
        assert judge.stats.pairs == {(p, r): 1 for p, r in zip(PROMPTS, RESPONSES, strict=True)}


@pytest.mark.parametrize("example", ["judge_custom.yaml", "judge_custom_batch.yaml"])
def test_shipped_custom_examples_round_trip(judge, example, monkeypatch):
    monkeypatch.setenv("JUDGE_API_KEY", SECRET)
    judge.settings.token = SECRET
    cfg = load_example(example, judge)
    assert cfg.normalize and cfg.score_range == (0, 10)
    scores = score(build_api_reward(cfg))
    assert values(scores) == [v / 10 for v in EXPECTED]  # normalised 0..10 -> 0..1
    assert judge.stats.snapshot()["requests"] == (1 if cfg.batch_field else len(PROMPTS))
    assert judge.stats.snapshot()["max_per_pair"] == 1


def test_custom_success_condition_unmet_is_a_failure(judge):
    judge.settings.fault_rate, judge.settings.fault_kinds = 1.0, ("unsuccessful",)
    scores = score(build_api_reward(load_example("judge_custom.yaml", judge, headers={})))
    assert all(s.value is None and s.reason.startswith("unsuccessful reply") for s in scores)


def test_openrlhf_extra_logs_become_metrics(judge):
    reward = make(judge, "openrlhf", batch_size=4)
    score(reward)
    metrics = reward.metrics()
    assert metrics["reward/extra/response_chars"] == pytest.approx(sum(map(len, RESPONSES)) / 4)
    assert metrics["reward/requests"] == 1


def test_response_paths():
    reply = {"results": [{"score": 1}, {"score": 2.5}], "data": {"score": 7}}
    assert resolve(reply, parse_path("results[*].score"), "p") == [1, 2.5]
    assert resolve(reply, parse_path("data.score"), "p") == 7
    assert resolve(reply, parse_path("results[1].score"), "p") == 2.5
    with pytest.raises(ReplyError, match="wrong shape"):
        resolve(reply, parse_path("data.value"), "data.value")
    with pytest.raises(ValueError, match="bad path"):
        parse_path("data..score")


def test_openai_judge_regex_range_and_normalize(judge):
    scores = score(make(judge, "openai_judge", score_range=(0, 1.5)))
    assert values(scores) == [1.0, None, 0.0, 0.0]
    assert scores[1].reason == "out of range: 2 not in [0, 1.5]"
    scores = score(make(judge, "openai_judge", score_range=(0, 10), normalize=True))
    assert values(scores) == [0.1, 0.2, 0.0, 0.0]


# -- faults ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "reason", "only_first"),
    [
        ("500", "HTTP 500: injected fault", False),
        ("timeout", "timeout: no reply within 0.3 s", False),
        ("malformed", "malformed JSON", False),
        ("wrong_count", "wrong count: sent 2 items, 'scores' has 1 values", False),
        ("429", "HTTP 429", False),
        ("oversize", "oversize body: reply declares", False),
        ("nan", "non-finite score: nan", True),
        ("non_numeric", "non-numeric score: 'n/a'", True),
    ],
)
def test_every_fault_is_a_failure_with_its_reason(judge, kind, reason, only_first):
    judge.settings.fault_rate, judge.settings.fault_kinds = 1.0, (kind,)
    judge.settings.hang_s, judge.settings.oversize_bytes = 1.0, 50_000
    reward = make_source(judge, batch_size=2, timeout_s=0.3, max_body_bytes=10_000)
    scores = score(reward)
    failed = [s for i, s in enumerate(scores) if not only_first or i % 2 == 0]
    assert all(s.value is None and s.reason.startswith(reason) for s in failed), [s.reason for s in failed]
    if only_first:  # one bad value in a batch fails that sample only
        assert values(scores)[1::2] == EXPECTED[1::2]
    assert reward.metrics()["reward/failures"] == len(failed)
    assert sum(reward.failure_summary().values()) == len(failed)


def test_retries_recover_from_transient_faults(judge):
    judge.settings.fault_first, judge.settings.fault_kinds = 3, ("500", "malformed", "timeout")
    judge.settings.hang_s = 2.0
    reward = make_source(judge, batch_size=4, max_retries=3, timeout_s=0.6)
    assert values(score(reward)) == EXPECTED
    metrics = reward.metrics()
    assert metrics["reward/retries"] == 3 and metrics["reward/failures"] == 0
    assert judge.stats.snapshot()["requests"] == 4


def test_429_retry_after_is_honoured(judge):
    judge.settings.fault_first, judge.settings.fault_kinds, judge.settings.retry_after_s = 1, ("429",), 0.6
    reward = make(judge, batch_size=4, max_retries=1, backoff=0.01)
    start = time.perf_counter()
    assert values(score(reward)) == EXPECTED
    assert time.perf_counter() - start >= 0.55  # waited Retry-After, not the 10 ms backoff
    assert reward.metrics()["reward/retries"] == 1


def test_auth_failure_is_not_retried(judge):
    judge.settings.token = SECRET
    reward = make(judge, batch_size=4, max_retries=3)
    scores = score(reward)
    assert all(s.reason.startswith("auth failure: ") for s in scores)
    assert judge.stats.snapshot()["requests"] == 0  # rejected before the handler
    assert reward.metrics()["reward/retries"] == 0


def test_server_going_away_mid_run_fails_every_sample():
    srv = start_judge_server()
    reward = CountFailures(build_api_reward(
        parse_reward_api({"url": srv.url_for("alignkit"), "max_retries": 1, "backoff": 0.01, "timeout_s": 2.0})
    ))

    async def go():
        first = await reward.score(PROMPTS, RESPONSES)
        srv.stop()
        second = await reward.score(PROMPTS, RESPONSES[::-1])
        await reward.aclose()
        return first, second

    first, second = asyncio.run(go())
    assert values(first) == EXPECTED
    assert all(s.value is None and s.reason.startswith("connection error") for s in second)
    assert reward.failure_summary() == {"connection error": 4}


def test_concurrency_is_bounded_and_used(fresh_judge):
    judge = fresh_judge
    judge.settings.latency_ms = 50
    scores = score(make(judge, max_concurrency=4), PROMPTS * 3, [f"good {i}" for i in range(12)])
    assert all(s.value == 1.0 for s in scores)
    assert judge.stats.snapshot()["max_in_flight"] == 4  # never more, and not one at a time


def test_rate_limit(judge):
    reward = make(judge, rate_limit_rps=20)
    start = time.perf_counter()
    score(reward, PROMPTS, RESPONSES)
    assert time.perf_counter() - start >= 0.14  # 4 requests spaced 50 ms apart


# -- cache -------------------------------------------------------------------------------


def test_cache_survives_restart_and_dedups_within_a_step(judge, tmp_path):
    db = tmp_path / "cache.sqlite"
    first = make_source(judge, {"reward_cache": str(db)})
    assert values(score(first, PROMPTS + PROMPTS[:2], RESPONSES + RESPONSES[:2])) == EXPECTED + EXPECTED[:2]
    assert judge.stats.snapshot()["items"] == 4  # the two repeats were sent once
    assert first.metrics()["reward/cache_hits"] == 0

    restarted = make_source(judge, {"reward_cache": str(db)})  # a new process would build exactly this
    scores = score(restarted)
    assert values(scores) == EXPECTED and all(s.cached for s in scores)
    assert judge.stats.snapshot()["items"] == 4
    assert restarted.metrics()["reward/cache_hits"] == 4

    other_preset = make_source(judge, {"reward_cache": str(db)}, preset="openrlhf")  # another identity: no reuse
    assert not any(s.cached for s in score(other_preset))


def test_failures_are_not_cached(judge, tmp_path):
    db = str(tmp_path / "cache.sqlite")
    judge.settings.fault_rate, judge.settings.fault_kinds = 1.0, ("500",)
    assert all(not s.ok for s in score(make_source(judge, {"reward_cache": db})))
    judge.settings.fault_rate = 0.0
    scores = score(make_source(judge, {"reward_cache": db}))
    assert values(scores) == EXPECTED and not any(s.cached for s in scores)


# -- secrets -----------------------------------------------------------------------------


def test_env_headers_substituted_and_never_shown(judge, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("JUDGE_API_KEY", SECRET)
    judge.settings.token = SECRET
    headers = {"Authorization": "Bearer ${JUDGE_API_KEY}"}
    good = make(judge, headers=headers)
    assert values(score(good)) == EXPECTED

    judge.settings.token = "another-token"  # now our (secret) token is wrong
    bad = make(judge, headers=headers)
    with pytest.raises(RewardApiError) as err:
        asyncio.run(bad.health_check())
    message = str(err.value)
    assert "auth failure" in message and "Bearer ${JUDGE_API_KEY}" in message and "HTTP 401" in message
    failed = score(make(judge, headers=headers, max_retries=1))
    shown = [
        message,
        repr(bad.cfg),
        str(bad.cfg.redacted()),
        str(bad.cfg.model_dump()),
        bad.cfg.model_dump_json(),
    ]
    shown += [s.reason for s in failed] + [r.getMessage() for r in caplog.records]
    assert all(SECRET not in text for text in shown)
    assert bad.cfg.redacted()["headers"] == headers


def test_missing_env_var_is_named(monkeypatch):
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    cfg = parse_reward_api({"url": "http://127.0.0.1:9/score", "headers": {"X-Key": "${NO_SUCH_JUDGE_KEY}"}})
    with pytest.raises(RewardApiError, match="environment variable NO_SUCH_JUDGE_KEY is not set"):
        build_api_reward(cfg)


def test_literal_secret_headers_are_masked_when_saved():
    cfg = parse_reward_api({"url": "http://x/score", "headers": {"Authorization": f"Bearer {SECRET}", "X-Team": "rl"}})
    dumped = cfg.model_dump()
    assert dumped["headers"] == {"Authorization": "***", "X-Team": "rl"}
    assert SECRET not in repr(cfg) and SECRET not in cfg.model_dump_json()
    assert cfg.headers["Authorization"] == f"Bearer {SECRET}"  # still used for requests


# -- thinking models ---------------------------------------------------------------------


def test_strip_think():
    assert strip_think("<think>good good</think> bad") == ("bad", False)
    assert strip_think("plan</think>answer") == ("answer", False)  # <think> was in the prompt
    assert strip_think("intro <think>a</think>x<think>b</think>y") == ("intro y", False)
    assert strip_think("<think>still thinking, good") == ("", True)
    assert strip_think("[t]x[/t]y", ("[t]", "[/t]")) == ("y", False)
    assert think_truncated_frac(["<think>a</think>b", "<think>a", "c", "d"]) == 0.25


def test_think_stripped_before_scoring_and_truncation_policy(judge):
    responses = ["<think>good good good</think>good", "<think>good", "no thought", "<think>good"]
    reward = make_source(judge, {"strip_think": True, "think_truncated_score": -1.0})
    scores = score(reward, responses=responses)
    assert values(scores) == [1.0, -1.0, 0.0, -1.0]
    assert judge.stats.snapshot()["items"] == 2  # truncated thoughts are not sent
    assert ("Say hi.", "good") in judge.stats.pairs
    assert reward.metrics()["rollout/think_truncated_frac"] == 0.5

    scores = score(make_source(judge, {"strip_think": True, "think_truncated": "fail"}), responses=responses)
    assert scores[1].value is None and scores[1].reason.startswith("think truncated")


# -- start-up check ----------------------------------------------------------------------


def test_health_check_passes(judge):
    probe = asyncio.run(make(judge, "openai_judge").health_check())
    assert probe.ok


def test_health_check_retries_an_unsuccessful_reply_like_a_5xx(judge):
    """One ``{"success": false}`` at start is a busy judge, not a dead one: the probe retries it
    (scoring requests do not: there it is the sample's failure)."""
    judge.settings.fault_first, judge.settings.fault_kinds = 1, ("unsuccessful",)
    probe = asyncio.run(build_api_reward(load_example("judge_custom.yaml", judge, headers={}, max_retries=2,
                                                      backoff=0.01)).health_check())
    assert probe.ok and judge.stats.snapshot()["requests"] == 2
    judge.stats.reset()
    judge.settings.fault_first, judge.settings.fault_rate = 0, 1.0  # always unsuccessful: it gives up
    with pytest.raises(RewardApiError, match=r"start-up check failed: unsuccessful reply"):
        asyncio.run(build_api_reward(load_example("judge_custom.yaml", judge, headers={}, max_retries=2,
                                                  backoff=0.01)).health_check())
    assert judge.stats.snapshot()["requests"] == 3


def test_health_check_unreachable():
    srv = start_judge_server()
    url = srv.url_for("alignkit")
    srv.stop()
    reward = build_api_reward(parse_reward_api({"url": url, "timeout_s": 2.0}))
    with pytest.raises(RewardApiError) as err:
        asyncio.run(reward.health_check())
    message = str(err.value)
    assert "start-up check failed: connection error" in message
    assert f"POST {url}" in message and '"items"' in message and "(no reply)" in message


def test_health_check_wrong_shape_shows_request_and_reply(judge):
    payload = {"inputParams": {"query": "{prompt}", "model_answer": "{response}"}}
    cfg = parse_reward_api(
        {"url": judge.url_for("custom"), "preset": "custom", "payload": payload, "response_path": "result.score"}
    )
    with pytest.raises(RewardApiError) as err:
        asyncio.run(build_api_reward(cfg).health_check())
    message = str(err.value)
    assert "wrong shape: reply has no 'result.score'" in message
    assert "request sent:" in message and '"model_answer": "4"' in message
    assert "reply received:\n  HTTP 200" in message and '"data": 0.0' in message


def test_health_check_rejected_request_shows_reply(judge):
    cfg = parse_reward_api({"url": judge.url_for("openrlhf"), "preset": "alignkit"})  # wrong path for the shape
    with pytest.raises(RewardApiError, match=r"(?s)HTTP 422.*reply received:\n  HTTP 422.*Field required"):
        asyncio.run(build_api_reward(cfg).health_check())


# -- config ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"timeout": 3}, "Extra inputs are not permitted"),
        ({"normalize": True}, "needs reward_api.score_range"),
        ({"preset": "openai_judge"}, r"(?s)openai_judge\.model\s+Field required"),
        ({"preset": "custom"}, r"(?s)custom\.payload\s+Field required"),
        ({"preset": "custom", "payload": {"a": "{response}"}, "batch_field": "b"}, "not a key of reward_api.payload"),
        ({"preset": "openai_judge", "model": "m", "batch_size": 4}, "one sample per request"),
        ({"preset": "openai_judge", "model": "m", "score_regex": "("}, "not a valid regex"),
        ({"score_regex": "("}, "score_regex\n  Extra inputs"),  # an openai_judge key
        ({"preset": "custom", "payload": {"q": "{response}"}, "success_condition": "success"}, "bad success condition"),
        ({"preset": "custom", "payload": {}}, "at least 1 item"),
        ({"on_failure": "ignore"}, "'skip', 'zero' or 'fail'"),
        ({"url": "ftp://judge/score"}, "reward_api.url must be an http"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ValidationError, match=match):
        RewardSpec(reward_model_type="api", reward_api={"url": "http://127.0.0.1:1/score", **kw})


def test_every_config_key_has_help_text():
    for cls in (RewardSpec, *ApiSettings.__subclasses__()):
        for name, field in cls.model_fields.items():
            assert field.description, (cls.__name__, name)


def test_url_required_and_checked():
    with pytest.raises(RewardApiError, match="reward_api.url is not set"):
        build_api_reward(parse_reward_api({}))
    with pytest.raises(ValueError, match="reward_model must be an http"):
        RewardSpec(reward_model_type="api", reward_model="judge:8000/score")
    spec = RewardSpec(reward_model_type="api", reward_model="http://judge:8000/score", reward_api={"timeout_s": 5})
    assert spec.api_settings().url == "http://judge:8000/score" and spec.api_settings().timeout_s == 5


# -- metrics and background scoring ------------------------------------------------------


def test_metrics_reset_on_read(judge):
    judge.settings.latency_ms = 20
    reward = make_source(judge)
    score(reward)
    metrics = reward.metrics()
    assert metrics["reward/requests"] == 4 and metrics["reward/failures"] == 0
    assert 0.02 <= metrics["reward/latency_p50"] <= metrics["reward/latency_p95"] < 1.0
    assert reward.metrics()["reward/requests"] == 0
    assert "reward/latency_p50" not in reward.metrics()


def test_background_scorer_overlaps_with_main_thread(fresh_judge):
    judge = fresh_judge
    judge.settings.latency_ms = 300
    reward = make(judge, max_concurrency=8)
    with BackgroundScorer(reward) as scorer:
        assert scorer.run(reward.health_check()).ok
        futures = [scorer.submit(PROMPTS, RESPONSES, ScoreMeta()) for _ in range(2)]
        # The main thread keeps running while both chunks' 8 requests are at the judge at once.
        seen = 0
        for _ in range(2000):  # at most ~2 s
            seen = max(seen, judge.stats.in_flight)
            if seen == 8:
                break
            time.sleep(0.001)
        assert seen == 8 and not any(f.done() for f in futures)
        results = [f.result(timeout=10) for f in futures]
    assert all(values(r) == EXPECTED for r in results)
    assert judge.stats.snapshot()["items"] == 1 + 8
