"""PPO on the tiny real model scored by the judge server over real HTTP on 127.0.0.1 (no mocks)."""

from __future__ import annotations

import json

import httpx
import pytest
import yaml
from safetensors.torch import load_file

from alignkit.config import load_config
from alignkit.judge.server import start_judge_server
from alignkit.report import write_report
from alignkit.rewards.api.client import RewardApiError
from alignkit.rewards.failures import RewardFailureError
from alignkit.train import ppo
from alignkit.train.checkpoint import list_checkpoints, load_state
from alignkit.train.common import output_dir_error
from alignkit.train.tracking import read_metrics
from tests.conftest import EXAMPLES

pytestmark = pytest.mark.slow

SECRET = "s3cr3t-Judge-Token-0042"
ROLLOUT = 4  # prompts per step: per_device 2 x buffer 2
DISTINCT = None  # set by the autouse fixture below


@pytest.fixture(autouse=True)
def _use_distinct_prompts(distinct_prompts, monkeypatch):
    monkeypatch.setitem(globals(), "DISTINCT", distinct_prompts)


@pytest.fixture(scope="module")
def distinct_prompts(tmp_path_factory):
    """Prompts that are all different, so no two samples are the same (prompt, response) pair:
    identical pairs share one request within a step and hit the cache across steps, which
    would blur the request counts these tests check."""
    path = tmp_path_factory.mktemp("data") / "distinct.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say something good about item {i}."}) + "\n"
                            for i in range(64)))
    return path


def ppo_api_config(model_dir, out, url, *overrides, reward_api=None):
    """``examples/ppo_tiny.yaml`` made small (4 prompts a step, 8 new tokens), reward from ``url``."""
    return load_config(
        EXAMPLES / "ppo_tiny.yaml",
        [f"model_name_or_path={model_dir}", "adapter_name_or_path=null", f"output_dir={out}", f"dataset={DISTINCT}",
         f"dataset_dir={EXAMPLES / 'data'}", "report_to=none", "plot_loss=false", "seed=0",
         "per_device_train_batch_size=2", "ppo_buffer_size=2", "ppo_epochs=1", "max_new_tokens=8",
         "max_steps=3", "reward_model_type=api", f"reward_model={url}", "reward_api.max_retries=0",
         "judge_canaries=false",  # canaries would add requests to the counts checked here
         *overrides],
        reward_api=reward_api or {},
    )


def constant(value: float):
    return lambda prompts, responses, labels: [value] * len(responses)


def test_custom_preset_scores_each_sample_once(tiny_model_dir, tmp_path, monkeypatch):
    # The internal-evaluation shape exactly as shipped, bearer token from the environment included.
    custom = yaml.safe_load((EXAMPLES / "judge_custom.yaml").read_text())["reward_api"]
    monkeypatch.setenv("JUDGE_API_KEY", SECRET)
    with start_judge_server(rule="count_good", token=SECRET) as judge:
        url = judge.url_for("custom")
        out = ppo.run(ppo_api_config(tiny_model_dir, tmp_path / "run", url, f"reward_api.url={url}",
                                     "reward_api.cache=null", reward_api=custom))
        stats = httpx.get(f"{judge.url}/stats", headers={"Authorization": f"Bearer {SECRET}"}).json()
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["reward/failures"] == 0 and r["reward/latency_p50"] > 0 for r in rows)
    assert all(0.0 <= r["env/reward_mean"] <= 1.0 for r in rows)  # count_good over 0..10, normalised
    # One request per sample (the custom shape is unbatched) plus the start-up probe; none twice.
    assert stats["items"] == stats["requests"] == 3 * ROLLOUT + 1
    assert stats["distinct_pairs"] == 3 * ROLLOUT + 1 and stats["max_per_pair"] == 1
    assert SECRET not in (out / "alignkit_config.yaml").read_text()


def test_injected_faults_are_skipped_not_zeroed(tiny_model_dir, tmp_path):
    with start_judge_server(constant(5.0), fault_rate=0.3, fault_kinds=("500", "malformed"), seed=0) as judge:
        out = ppo.run(ppo_api_config(tiny_model_dir, tmp_path / "run", judge.url_for("alignkit"),
                                     "per_device_train_batch_size=4",  # 8 prompts a step
                                     "reward_api.health_check=false", "reward_api.max_failure_rate=0.9"))
        faults = judge.stats.snapshot()["faults"]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert sum(r["reward/failures"] for r in rows) == sum(faults.values()) > 0
    assert set(faults) == {"500", "malformed"}
    # Every valid score is 5.0: a failure counted as 0 would pull the mean below it.
    assert all(r["env/reward_mean"] == 5.0 for r in rows), [r["env/reward_mean"] for r in rows]


def test_failure_rate_above_limit_stops_the_run_and_keeps_the_checkpoint(tiny_model_dir, tmp_path):
    seen = 0

    def score_then_break(prompts, responses, labels):
        # After the probe and step 1 (1 + 4 samples), every later request gets an HTTP 500.
        nonlocal seen
        seen += len(responses)
        if seen >= 1 + ROLLOUT:
            judge.settings.fault_rate = 1.0
        return [1.0] * len(responses)

    out = tmp_path / "run"
    with start_judge_server(score_then_break, fault_kinds=("500",)) as judge:
        with pytest.raises(RewardFailureError, match=r"4 of 4 scores failed .*max_failure_rate=0\.5.*HTTP 500"):
            ppo.run(ppo_api_config(tiny_model_dir, out, judge.url_for("alignkit"), "save_steps=1"))
    assert [r["step"] for r in read_metrics(out)] == [1]
    assert list_checkpoints(out) == [out / "checkpoint-1"]
    assert load_state(out / "checkpoint-1")["step"] == 1
    assert load_file(str(out / "checkpoint-1" / "adapter_model.safetensors"))
    assert not (out / "adapter_model.safetensors").exists()  # no final save after the error


def test_unreachable_judge_stops_before_the_first_step(tiny_model_dir, tmp_path):
    judge = start_judge_server()
    url = judge.url_for("alignkit")
    judge.stop()  # nothing listens on this port any more
    out = tmp_path / "run"
    with pytest.raises(RewardApiError) as err:
        ppo.run(ppo_api_config(tiny_model_dir, out, url))
    message = str(err.value)
    assert "start-up check failed: connection error" in message
    assert f"POST {url}" in message and '"response": "4"' in message and "(no reply)" in message
    assert read_metrics(out) == []
    # Nothing left there blocks the re-run: no overwrite_output_dir needed (LLaMA-Factory configs rarely set it).
    assert [p.name for p in out.iterdir()] == ["alignkit_config.yaml"]
    assert output_dir_error(ppo_api_config(tiny_model_dir, out, url), out) is None


def test_wrong_token_fails_the_start_up_check_without_showing_it(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", SECRET)
    out = tmp_path / "run"
    with start_judge_server(token="the-right-token") as judge:
        with pytest.raises(RewardApiError) as err:
            ppo.run(ppo_api_config(tiny_model_dir, out, judge.url_for("alignkit"),
                                   "reward_api.headers.Authorization=Bearer ${JUDGE_KEY}"))
    message = str(err.value)
    assert "start-up check failed: auth failure" in message and "HTTP 401" in message
    assert "Bearer ${JUDGE_KEY}" in message and SECRET not in message
    assert not any(SECRET in p.read_text(errors="replace") for p in out.rglob("*") if p.is_file())


def test_cache_serves_a_repeated_run(tiny_model_dir, tmp_path):
    cache = tmp_path / "judge.sqlite"
    requests, rows = [], []
    with start_judge_server(rule="count_good") as judge:
        for name in ("first", "again"):  # same seed: the same rollouts
            judge.stats.reset()
            out = ppo.run(ppo_api_config(tiny_model_dir, tmp_path / name, judge.url_for("alignkit"),
                                         "max_steps=2", f"reward_api.cache={cache}"))
            requests.append(judge.stats.snapshot()["requests"])
            rows.append(read_metrics(out))
    assert sum(r["reward/cache_hits"] for r in rows[0]) == 0
    assert sum(r["reward/cache_hits"] for r in rows[1]) > 0
    assert requests[1] < requests[0] == 2 * ROLLOUT + 1
    assert [r["env/reward_mean"] for r in rows[1]] == [r["env/reward_mean"] for r in rows[0]]


def test_failures_on_unlogged_steps_are_summed_into_the_next_logged_row(tiny_model_dir, tmp_path):
    # logging_steps 10 over 6 steps: one row (the last step), which must hold every failure and
    # request of all six steps, as the judge itself counted them (issue: they covered one step).
    with start_judge_server(constant(5.0), fault_rate=0.3, fault_kinds=("500",), seed=1) as judge:
        out = ppo.run(ppo_api_config(tiny_model_dir, tmp_path / "run", judge.url_for("alignkit"), "max_steps=6",
                                     "logging_steps=10", "reward_api.health_check=false",
                                     "reward_api.max_failure_rate=0.95"))
        stats = judge.stats.snapshot()
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [6]
    faults = sum(stats["faults"].values())
    assert rows[0]["reward/failures"] == faults > 1
    assert rows[0]["rollout/samples"] == 6 * ROLLOUT
    assert rows[0]["reward/failure_rate"] == pytest.approx(faults / (6 * ROLLOUT))
    assert rows[0]["reward/requests"] == stats["requests"]  # every request of every step, none lost
    write_report(out)
    checks = {c["name"]: c for c in json.loads((out / "report" / "health.json").read_text())["checks"]}
    assert checks["reward_failures"]["verdict"] != "ok"  # a 30% failure rate is not healthy
