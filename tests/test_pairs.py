"""``alignkit pairs`` against the project's judge server over HTTP: pairs that respect the score
gap, failures skipped and counted, a resumed run equal to an uninterrupted one, and the whole
RLAIF loop (judge -> pairs -> DPO -> the judge scores the model's held-out answers higher)."""

from __future__ import annotations

import json

import pytest

from alignkit.cli import main
from alignkit.data.loader import load_examples
from alignkit.judge.server import start_judge_server
from alignkit.tools import pairs
from alignkit.tools.compare import CompareConfig, run_compare
from alignkit.tools.config import load_tool_config
from alignkit.tools.pairs import PAIRS_FILE, STATE_FILE, SUMMARY_FILE, PairsConfig, best_vs_worst, run_pairs
from tests.conftest import EXAMPLES

# count_good: the judge scores a response by how often it says "good".
JUDGE = ["reward_model_type=api", "reward_api.preset=alignkit", "reward_api.max_retries=0"]
# The start-up probe is one request: against a judge injecting faults it would fail at random.
NO_PROBE = "reward_api.health_check=false"


def pairs_config(model_dir, out, url, *overrides: str) -> PairsConfig:
    return load_tool_config(PairsConfig, EXAMPLES / "pairs_tiny.yaml", [
        f"model_name_or_path={model_dir}", f"output_dir={out}", f"dataset_dir={EXAMPLES / 'data'}",
        f"reward_model={url}", "reward_cache=null", "max_new_tokens=16", "batch_size=8", *JUDGE, *overrides])


def read_rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / PAIRS_FILE).read_text().splitlines()]


def test_best_vs_worst():
    texts = ["a", "b", "c", "d"]
    assert best_vs_worst(texts, [1.0, 3.0, 0.0, 2.0], [True] * 4, 1.0) == (1, 2)
    assert best_vs_worst(texts, [1.0, 3.0, 0.0, 2.0], [True, False, False, True], 1.0) == (3, 0)  # failures never picked
    assert best_vs_worst(texts, [1.0, 1.5, 1.2, 1.0], [True] * 4, 1.0) == "tie"  # gap below min_score_gap
    assert best_vs_worst(texts, [2.0] * 4, [True] * 4, 0.0) == "tie"  # equal scores
    assert best_vs_worst(["x", "x"], [2.0, 1.0], [True, True], 0.0) == "tie"  # equal texts
    assert best_vs_worst(texts, [1.0, 3.0, 0.0, 2.0], [False, False, True, False], 0.0) == "too_few_scored"


def test_pairs_from_a_faulty_judge_respect_the_gap_and_count_failures(tiny_model_dir, tmp_path):
    out = tmp_path / "pairs"
    with start_judge_server(rule="count_good", fault_rate=0.3, fault_kinds=("500",), seed=0) as judge:
        summary = run_pairs(pairs_config(tiny_model_dir, out, judge.url_for("alignkit"), "max_samples=32", NO_PROBE))
        faults = sum(judge.stats.snapshot()["faults"].values())
    rows = read_rows(out)
    assert summary["pairs"] == len(rows) > 5 and summary["prompts"] == 32
    assert all(r["chosen_score"] >= r["rejected_score"] + 1.0 for r in rows)  # min_score_gap: 1.0
    # Identical (prompt, response) pairs share one request, so one fault can fail several responses.
    assert summary["failed_scores"] >= faults > 0 and summary["failures_by_reason"] == {"HTTP 500": summary["failed_scores"]}
    assert summary["skipped_ties"] > 0
    assert summary["pairs"] + summary["skipped_ties"] + summary["skipped_too_few_scored"] == 32
    # Every stage that reads preference data reads the output as it is.
    for kind in ("pairwise", "kto"):
        examples = load_examples("pairs", str(out), kind)
        assert len(examples) == len(rows) and examples[0].chosen == rows[0]["chosen"]["content"]


def test_pairs_resume_after_a_crash_equals_an_uninterrupted_run(tiny_model_dir, tmp_path, monkeypatch):
    with start_judge_server(rule="count_good") as judge:
        url = judge.url_for("alignkit")
        run_pairs(pairs_config(tiny_model_dir, tmp_path / "full", url, "max_samples=24"))
        save, calls = pairs.save_progress, []

        def save_then_crash(*args):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            save(*args)

        monkeypatch.setattr(pairs, "save_progress", save_then_crash)
        cut = pairs_config(tiny_model_dir, tmp_path / "cut", url, "max_samples=24", f"reward_cache={tmp_path / 'c.sqlite'}")
        with pytest.raises(KeyboardInterrupt):
            run_pairs(cut)
        monkeypatch.undo()
        assert json.loads((tmp_path / "cut" / STATE_FILE).read_text())["counts"]["prompts"] == 8  # one chunk done
        before = judge.stats.snapshot()["items"]
        summary = run_pairs(cut)
        rescored = judge.stats.snapshot()["items"] - before
    assert read_rows(tmp_path / "cut") == read_rows(tmp_path / "full")
    assert summary["prompts"] == 24
    assert rescored < 16 * 4  # the chunk scored before the crash came from the cache
    with pytest.raises(ValueError, match="sampled with other settings"):
        run_pairs(pairs_config(tiny_model_dir, tmp_path / "cut", "http://127.0.0.1:1/score", "max_samples=24",
                               "num_generations=2"))


@pytest.mark.slow
def test_rlaif_loop_raises_the_judges_score_on_held_out_prompts(tiny_model_dir, tmp_path):
    """Judge (with faults) -> `alignkit pairs` -> `alignkit train` DPO -> the judge prefers the new model."""
    prompts = (EXAMPLES / "data" / "prompts_demo.jsonl").read_text().splitlines()
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("\n".join(prompts[96:]) + "\n")  # pairs use the first 96 prompts
    out = tmp_path / "pairs"
    with start_judge_server(rule="count_good", fault_rate=0.2, fault_kinds=("500",), seed=1) as judge:
        assert main(["pairs", str(EXAMPLES / "pairs_tiny.yaml"), f"model_name_or_path={tiny_model_dir}",
                     f"output_dir={out}", f"dataset_dir={EXAMPLES / 'data'}", f"reward_model={judge.url_for('alignkit')}",
                     "reward_cache=null", "max_new_tokens=16", "max_samples=96", *JUDGE, NO_PROBE]) == 0
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["failed_scores"] > 0 and summary["pairs"] >= 40
    dpo_out = tmp_path / "dpo"
    assert main(["train", str(EXAMPLES / "dpo_tiny.yaml"), f"model_name_or_path={tiny_model_dir}", "dataset=pairs",
                 f"dataset_dir={out}", f"output_dir={dpo_out}", "val_size=0", "eval_strategy=no", "max_steps=20",
                 "per_device_train_batch_size=8", "report_to=none", "plot_loss=false"]) == 0
    with start_judge_server(rule="count_good") as judge:
        result = run_compare(load_tool_config(CompareConfig, None, [
            f"model_a={tiny_model_dir}", f"model_b={dpo_out}", "template=chatml", f"dataset={held_out}",
            "max_new_tokens=16", f"reward_model={judge.url_for('alignkit')}", f"output_dir={tmp_path / 'compare'}",
            "device=cpu", *JUDGE]))
    before, after = result["model_a"]["mean_reward"], result["model_b"]["mean_reward"]
    assert after > before + 0.3, (before, after)
    assert result["b_vs_a_counts"]["win"] > result["b_vs_a_counts"]["loss"]
