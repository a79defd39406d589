"""Calibrated scores and canaries against a real LLM judge: vLLM's OpenAI server (.venv-vllm) on
SmolLM2-135M-Instruct, started once for the module (~1 min on 2 CPU cores).

The 32 items of bench/judge_quality.py (8 questions x 4 answers of known quality) are scored as free
text, as JSON (structured output) and from log-probabilities (G-Eval). A 135M model is a weak judge:
the claims checked are the ones the features make, not that it ranks well.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from alignkit.config import load_config
from alignkit.judge.llm import LLM_RUBRIC, LLM_SCORE_REGEX, LLMJudgeProcess
from alignkit.models.gguf import convert_gguf
from alignkit.report import write_report
from alignkit.train import ppo
from alignkit.train.tracking import read_metrics
from tests.conftest import EXAMPLES
from tests.real_judge import smollm2_judge

ROOT = Path(__file__).resolve().parents[1]
GGUF, MISSING = smollm2_judge()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING is not None, reason=str(MISSING))]


def _bench():
    spec = importlib.util.spec_from_file_location("judge_quality", ROOT / "bench" / "judge_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def llm_judge(tmp_path_factory):
    with LLMJudgeProcess(convert_gguf(GGUF), log=tmp_path_factory.mktemp("vllm") / "server.log") as judge:
        yield judge


@pytest.fixture(scope="module")
def quality(llm_judge):
    bench = _bench()
    return bench.run(llm_judge.url, llm_judge.name, "SmolLM2-135M-Instruct", ["text", "json", "logprobs"])


def test_json_scores_always_parse(quality):
    assert quality["text"]["parsed"] < 32  # the free-text judge often writes no number
    assert quality["json"]["parsed"] == 32 and quality["json"]["failures"] == []


def test_logprob_scores_rank_better_than_free_text(quality):
    text, logprobs = quality["text"], quality["logprobs"]
    assert logprobs["parsed"] > text["parsed"]
    assert logprobs["distinct_scores"] > text["distinct_scores"]  # a finer signal: fewer ties
    assert logprobs["spearman"] > text["spearman"], (logprobs["spearman"], text["spearman"])


def test_canaries_against_the_real_judge(llm_judge, tiny_model_dir, tmp_path):
    cfg = load_config(EXAMPLES / "ppo_tiny.yaml", [
        f"model_name_or_path={tiny_model_dir}", "adapter_name_or_path=null", f"output_dir={tmp_path / 'run'}",
        f"dataset_dir={EXAMPLES / 'data'}", "report_to=none", "plot_loss=false", "seed=0",
        "per_device_train_batch_size=2", "ppo_buffer_size=2", "ppo_epochs=1", "max_new_tokens=8", "max_steps=1",
        "reward_model_type=api", f"reward_model={llm_judge.url}", "max_failure_rate=1.0"],
        reward_api={"preset": "openai_judge", "model": llm_judge.name, "rubric": LLM_RUBRIC,
                    "score_regex": LLM_SCORE_REGEX, "score_range": [0, 10], "score_format": "json",
                    "timeout_s": 120, "max_retries": 0, "health_check": False})
    out = ppo.run(cfg)
    (row,) = read_metrics(out)
    write_report(out)
    (check,) = [c for c in json.loads((out / "report" / "health.json").read_text())["checks"]
                if c["name"] == "judge_canaries"]
    canaries = {k: v for k, v in row.items() if k.startswith("canary/")}
    print("real judge canaries:", canaries, "->", check)
    names = {"colon", "empty", "thought_process", "step_by_step", "prompt_echo"}
    assert names <= {k.removeprefix("canary/") for k in canaries}
    assert check["verdict"] in ("ok", "fail")  # JSON scores: every canary got a number to compare
    beaten = [n for n in names if row[f"canary/{n}"] >= row["canary/real_median"]]
    assert (check["verdict"] == "fail") == bool(beaten)
    if beaten:  # the check names a canary that beat the median real response
        assert any(f"'{n}'" in check["detail"] for n in beaten), check["detail"]
