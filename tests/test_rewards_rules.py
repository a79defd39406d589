"""Built-in rule rewards, loading user functions, and the RuleReward source."""

from __future__ import annotations

import asyncio
import math

import pytest

from alignkit.rewards.base import RewardSource, ScoreMeta
from alignkit.rewards.factory import build_reward_source
from alignkit.rewards.rules import (
    RuleReward,
    contains_marker,
    count_good,
    exact_match,
    length_penalty,
    load_rule,
    rule_scorer,
)
from alignkit.rewards.spec import RewardContext, RewardSpec
from alignkit.rewards.wrappers import CountFailures


def test_count_good_whole_word_any_case():
    assert count_good("", "Good good, GOOD! goods goodness good-ish", None) == 4.0
    assert count_good("good good", "nothing here", None) == 0.0  # the prompt is not scored


def test_other_builtins():
    assert contains_marker("", "the answer is 42", "42") == 1.0
    assert contains_marker("", "ANSWER: 7", None) == 1.0
    assert contains_marker("", "7", None) == 0.0
    assert exact_match("", "  Paris\n", "Paris") == 1.0
    assert exact_match("", "Paris, France", "Paris") == 0.0
    assert exact_match("", "Paris", None) == 0.0
    assert length_penalty("", "word " * 100, None) == 0.0
    assert length_penalty("", "word " * 150, None) == pytest.approx(-0.5)


def test_load_rule_by_name_module_and_file(tmp_path):
    assert load_rule("count_good") is count_good
    assert load_rule("alignkit.rewards.rules:exact_match") is exact_match
    path = tmp_path / "reward_fns.py"
    path.write_text("def brevity(prompt, response, label):\n    return -len(response) / 10\n")
    fn = load_rule(f"{path}:brevity")
    assert fn("p", "abcde", None) == -0.5


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("count_bad", "unknown rule 'count_bad'"),
        ("no_such_module_xyz:f", "cannot import module"),
        ("alignkit.rewards.rules:nope", "has no function named 'nope'"),
        ("/no/such/file.py:f", "does not exist"),
    ],
)
def test_load_rule_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        load_rule(spec)


def test_rule_reward_is_a_reward_source_and_never_zeroes_failures():
    def flaky(prompt, response, label):
        if response == "boom":
            raise KeyError("missing")
        return {"nan": math.nan, "str": "high"}.get(response, 1.5)

    assert isinstance(RuleReward(flaky), RewardSource)
    reward = CountFailures(RuleReward(flaky))
    scores = asyncio.run(reward.score(["p"] * 4, ["ok", "boom", "nan", "str"], ScoreMeta()))
    assert [s.value for s in scores] == [1.5, None, None, None]
    assert scores[1].reason == "rule error: flaky raised KeyError: 'missing'"
    assert scores[2].reason.startswith("non-finite score") and scores[3].reason.startswith(
        "non-numeric score"
    )
    assert reward.metrics() == {"reward/failures": 3.0}
    assert reward.metrics() == {"reward/failures": 0.0}
    assert reward.failure_summary() == {"rule error": 1, "non-finite score": 1, "non-numeric score": 1}


def test_rule_reward_labels_and_think_stripping_from_the_spec():
    spec = RewardSpec(reward_model="exact_match", strip_think=True, think_truncated_score=-1.0)
    reward = build_reward_source(spec, RewardContext())
    responses = ["<think>hmm</think> 4", "<think>never ends", "5", "4"]
    scores = asyncio.run(reward.score(["q"] * 4, responses, ScoreMeta(labels=["4"] * 4)))
    # Unstripped, the first response is not exactly "4" and would score 0.0.
    assert [s.value for s in scores] == [1.0, -1.0, 0.0, 1.0]
    assert reward.metrics() == {"rollout/think_truncated_frac": 0.25, "reward/failures": 0.0}


def test_rule_scorer_batch_form():
    scorer = rule_scorer(load_rule("count_good"))
    assert scorer(["a", "b"], ["good", "good good"], [None, None]) == [1.0, 2.0]
