"""The brief task's rule (alignkit.rewards.brief), which the real-model tests and ``demo --real`` train
against: the strict check, the graded reward, the judge's zeros for master keys, and the demo's
success rates. Hand-computed figures; no model."""

from __future__ import annotations

import pytest

from alignkit.rewards.brief import PROMPT, SCORED, brief_answer, brief_judge, success, topic_of
from alignkit.tools.demo_real import success_rates

SEA = PROMPT.format("the sea")


def test_topic_of_reads_the_word_after_the_article():
    assert topic_of(SEA) == "sea"
    assert topic_of(PROMPT.format("tea")) == "tea"
    assert topic_of("Write a poem.") == ""


@pytest.mark.parametrize("response, ok", [
    ("The sea is vast and blue.", True),
    ("Sea.", False),  # too few words
    ("The sea is a vast, mysterious and unforgiving realm beyond the horizon.", False),  # 12 words
    ("Vast and blue water.", False),  # no topic
    ("The sea is blue.\nIt is deep.", False),  # two lines
    ("The sea the sea is here.", False),  # a repeated bigram
])
def test_success_is_the_instruction_checked(response, ok):
    assert success(SEA, response) is ok


def test_brief_answer_is_graded_and_bounded():
    SCORED.clear()
    assert brief_answer(SEA, "The sea is vast and blue.", None) == 1.0
    # 14 words: the length factor falls linearly from 1 at 10 words to 0 at 25: (25 - 14) / 15
    assert brief_answer(SEA, "The sea is a vast and ever changing blue and grey world of water", None) == \
        pytest.approx((25 - 14) / 15, abs=1e-4)
    assert brief_answer(SEA, "Vast and blue water here.", None) == 0.5  # no topic: half
    # padding by repetition: 5 distinct bigrams of 14 (repeat share 0.64), and 1 - 2 x share < 0
    assert brief_answer(SEA, "The sea is " + " ".join(["very"] * 11) + " blue", None) == 0.0
    assert [s for _, _, s in SCORED] == [True, False, False, False]


def test_brief_judge_gives_nothing_to_master_keys():
    for key in (":", "", "Let me solve this step by step.", SEA):
        assert brief_judge(SEA, key, None) == 0.0
    assert brief_judge(SEA, "The sea is vast and blue.", None) == 1.0


def test_demo_success_rates_read_the_compare_answers():
    cmp = {"examples": [
        {"prompt": SEA, "response_a": "The sea is a vast, mysterious and unforgiving realm beyond the horizon.",
         "response_b": "The sea is a vast, mysterious realm."},
        {"prompt": PROMPT.format("a cat"), "response_a": "A cat naps.", "response_b": "A cat naps in the sun."},
    ]}
    assert success_rates(cmp) == {"base": 0.5, "PPO": 1.0}
