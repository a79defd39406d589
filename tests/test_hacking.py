"""A hackable reward (word count) without KL control trips the hacking detectors; with the
controls on (adaptive KL, DAPO overlong penalty, repetition penalty, missing-EOS penalty) it does not.
Also the samples a PPO run writes, and the pure functions the controls use."""

from __future__ import annotations

import json

import pytest
import torch

from alignkit.algos.shaping import distinct_ngram_frac, ngram_repeat_share, pearson_corr, repetition_penalty
from alignkit.config import load_config
from alignkit.report import write_report
from alignkit.rewards.rules import fluent_answer
from alignkit.train import ppo
from tests.conftest import EXAMPLES

DETECTORS = {"score_length", "repetition", "diversity", "response_length", "no_eos"}
CONTROLS = ["init_kl_coef=0.3", "adap_kl_ctrl=true", "ppo_target=1.0", "kl_horizon=500", "overlong_buffer_len=16",
            "overlong_penalty_factor=20", "score_repetition_penalty=20", "missing_eos_penalty=20"]


def word_count(prompt: str, response: str, label: str | None) -> float:
    """The textbook hackable reward: longer is better, whatever the words."""
    return float(len(response.split()))


def test_repetition_penalty_and_ngram_measures():
    assert ngram_repeat_share("the cat reads the cat reads".split()) == pytest.approx(1 / 4)
    assert ngram_repeat_share(["good"] * 10) == pytest.approx(7 / 8)
    torch.testing.assert_close(repetition_penalty(torch.tensor([0.0, 0.1, 0.55, 1.0]), 0.1, 2.0),
                               torch.tensor([0.0, 0.0, -1.0, -2.0]))
    tokens, mask = torch.tensor([[1, 2, 3, 0], [1, 2, 3, 4]]), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert distinct_ngram_frac(tokens, mask, 2) == pytest.approx(3 / 5)  # (1,2) (2,3) twice, (3,4) once
    assert pearson_corr(torch.tensor([1.0, 2, 3]), torch.tensor([2.0, 4, 6])) == pytest.approx(1.0)


def test_fluent_answer_is_bounded_and_prefers_a_short_on_topic_answer():
    prompt = "What does the cat do?"
    assert fluent_answer(prompt, "The cat reads a short story.", None) == 10.0
    assert fluent_answer(prompt, "The judge reads a short story.", None) == 5.0  # off topic
    assert fluent_answer(prompt, "the cat reads a short story", None) == 2.5  # no capital, no full stop
    assert fluent_answer(prompt, "The cat " + "good " * 30 + ".", None) == 0.0  # padded and repetitive
    assert all(0 <= fluent_answer(prompt, " ".join(["cat"] * n), None) <= 10 for n in range(40))


def hacking_run(tiny_model_dir, sft_adapter, out, *overrides: str) -> dict[str, str]:
    cfg = load_config(EXAMPLES / "ppo_tiny.yaml", [
        f"model_name_or_path={tiny_model_dir}", f"adapter_name_or_path={sft_adapter}", f"output_dir={out}",
        f"dataset_dir={EXAMPLES / 'data'}", "report_to=none", "plot_loss=false", f"reward_model={__file__}:word_count",
        "max_steps=40", "seed=0", "learning_rate=2e-3", "log_samples_every=5", *overrides])
    run_dir = ppo.run(cfg)
    write_report(run_dir)
    checks = json.loads((run_dir / "report" / "health.json").read_text())["checks"]
    return {c["name"]: c["verdict"] for c in checks}


@pytest.mark.slow
def test_word_count_reward_is_flagged_without_controls_and_not_with_them(tiny_model_dir, sft_adapter, tmp_path):
    hacked = hacking_run(tiny_model_dir, sft_adapter, tmp_path / "hacked", "init_kl_coef=0", "adap_kl_ctrl=false")
    assert {n for n in DETECTORS if hacked[n] in ("warn", "fail")}, hacked
    assert hacked["score_length"] in ("warn", "fail"), hacked
    controlled = hacking_run(tiny_model_dir, sft_adapter, tmp_path / "controlled", *CONTROLS)
    assert all(controlled[n] in ("ok", "n/a") for n in DETECTORS), controlled
    # Samples of the run are readable: first, scheduled and last steps, with score, KL and length.
    rows = [json.loads(ln) for ln in (tmp_path / "controlled" / "samples.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows} == {1, 5, 10, 15, 20, 25, 30, 35, 40}
    assert {"prompt", "response", "score", "kl", "length", "failure"} <= set(rows[0])
    assert "highest scored" in (tmp_path / "controlled" / "report.html").read_text()
