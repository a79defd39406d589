"""Group judging against the judge server on 127.0.0.1: judge_mode listwise (a group's responses in one
request) and pairwise (every pair of a group, both orders)."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from alignkit.config import load_config
from alignkit.judge.server import start_judge_server
from alignkit.rewards.api.client import build_api_reward
from alignkit.rewards.api.config import parse_reward_api
from alignkit.train import ppo
from alignkit.train.tracking import read_metrics
from tests.conftest import EXAMPLES


def listwise(url: str, mode: str = "listwise", **keys):
    return build_api_reward(parse_reward_api({"preset": "openai_judge", "url": url, "model": "judge", "max_retries": 0,
                                              "judge_mode": mode, "score_range": [0, 10], **keys}))


def score(reward, prompts, responses):
    async def go():
        try:
            return await reward.score(prompts, responses)
        finally:
            await reward.aclose()
    return asyncio.run(go())


def test_one_request_per_group_and_scores_map_back():
    with start_judge_server(rule="count_good") as judge:
        got = score(listwise(judge.url_for("openai_judge")), ["P1"] * 4 + ["P2"] * 2,
                    ["good", "good good", "x", "good good good", "a", "good"])
        stats = judge.stats.snapshot()
    assert [s.value for s in got] == [1.0, 2.0, 0.0, 3.0, 0.0, 1.0]
    assert stats["requests"] == 2 and stats["items"] == 6


def test_the_group_is_shown_shuffled():
    # A judge that scores by position only: with the order shuffled, its scores do not follow the sampler's order.
    def by_position(prompts, responses, labels):
        return [float(i) for i in range(len(responses))]

    with start_judge_server(by_position) as judge:
        got = [s.value for s in score(listwise(judge.url_for("openai_judge")), ["P"] * 6, list("abcdef"))]
    assert sorted(got) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0] and got != sorted(got)


def test_an_unusable_listwise_reply_fails_its_group_only():
    with start_judge_server(rule="count_good", fault_first=1, fault_kinds=("wrong_count",)) as judge:
        got = score(listwise(judge.url_for("openai_judge")), ["P1"] * 3 + ["P2"] * 2,
                    ["good", "good a", "good b", "good c", "good d"])
    failed = [s for s in got if not s.ok]
    # Groups go out concurrently, so either may be the first request: one whole group failed, the other scored.
    assert len(failed) in (2, 3) and all(s.reason.startswith("wrong count") for s in failed)
    assert sorted(s.value for s in got if s.ok) == [1.0] * (5 - len(failed))


def test_pairwise_scores_are_win_rates_over_both_orders():
    with start_judge_server(rule="count_good") as judge:
        got = score(listwise(judge.url_for("openai_judge"), "pairwise", normalize=True), ["P"] * 3 + ["Q"],
                    ["good", "good good", "x", "good good good"])
        stats = judge.stats.snapshot()
    # "good good" beats both others in either order; "good" beats "x" only; "Q" has no pair: scored alone (0-10, normalised).
    assert [s.value for s in got] == [0.5, 1.0, 0.0, 0.3]
    assert stats["requests"] == 3 * 2 + 1


def test_pairwise_in_both_orders_cancels_position_bias():
    # A judge that always picks the first response shown: every response wins half its comparisons.
    with start_judge_server(rule="count_good", prefer_first=True) as judge:
        got = score(listwise(judge.url_for("openai_judge"), "pairwise"), ["P"] * 3, ["good", "good good", "x"])
    assert [s.value for s in got] == [0.5, 0.5, 0.5]


def test_listwise_config_errors():
    for bad in ({"judge_samples": 2, "temperature": 1.0}, {"score_from": "logprobs"},
                {"listwise_rubric": "no placeholder"}):
        with pytest.raises(ValidationError, match="listwise"):
            parse_reward_api({"preset": "openai_judge", "url": "http://127.0.0.1:1/v1", "model": "j",
                              "judge_mode": "listwise", "score_range": [0, 10], **bad})


@pytest.mark.slow
def test_grpo_listwise_sends_a_request_per_group(tiny_model_dir, sft_adapter, tmp_path):
    requests, items = {}, {}
    for mode in ("pointwise", "listwise"):
        with start_judge_server(rule="count_good") as judge:
            cfg = load_config(EXAMPLES / "grpo_tiny.yaml", [
                f"model_name_or_path={tiny_model_dir}", f"adapter_name_or_path={sft_adapter}",
                f"output_dir={tmp_path / mode}", f"dataset_dir={EXAMPLES / 'data'}", "report_to=none",
                "plot_loss=false", "seed=0", "max_steps=2", "max_new_tokens=8", "judge_canaries=false",
                "reward_model_type=api", f"reward_model={judge.url_for('openai_judge')}"],
                reward_api={"preset": "openai_judge", "model": "judge", "score_range": [0, 10], "judge_mode": mode,
                            "max_retries": 0})
            rows = read_metrics(ppo.run(cfg))
            requests[mode], items[mode] = (judge.stats.snapshot()[k] for k in ("requests", "items"))
        assert all(r["reward/failures"] == 0 for r in rows)
    # The same rule scores alike either way, so both runs sample and judge the same responses...
    assert items["listwise"] == items["pointwise"]
    # ... pointwise in one request each, listwise in one per group (8 prompts x 4 responses a step; two
    # groups of one prompt in a step share a request) plus the start-up probe.
    prompts_per_step, steps = 8, 2
    assert requests["pointwise"] == items["pointwise"] > 2 * requests["listwise"]
    assert requests["listwise"] <= steps * prompts_per_step + 1
    print(requests, items)
