"""``alignkit chat``, ``predict`` and ``compare`` end to end on the tiny model."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.rewards.rules import count_good
from alignkit.tools.compare import CompareConfig, run_compare
from tests.test_export import SYSTEM, build_runs

PROMPTS = ["Say something good.", "How are you?", "Is this <good> & fine?", "Write a greeting."]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    return build_runs(tiny_model_dir, tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "label": f"ref{i}"}) + "\n" for i, p in enumerate(PROMPTS)))
    return path


def test_predict_writes_jsonl_with_tokens_and_latency(runs, prompts_file, tmp_path, capsys):
    out = tmp_path / "pred.jsonl"
    cfg = tmp_path / "predict.yaml"
    cfg.write_text(f"model_name_or_path: {runs['sft']}\ndataset: {prompts_file}\nmax_new_tokens: 12\n"
                   "per_device_eval_batch_size: 3\ndo_predict: true\n")
    assert main(["predict", str(cfg), f"output_file={out}"]) == 0
    assert "tokens/s" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"] for r in rows] == ["ref0", "ref1", "ref2", "ref3"]
    # The run dir brought its template and default system prompt.
    assert rows[0]["prompt"].startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nSay something good.")
    assert all(0 < r["tokens"] <= 12 and r["latency_s"] > 0 and isinstance(r["response"], str) for r in rows)
    # Greedy: a second run gives the same text.
    assert main(["predict", str(cfg), f"output_file={tmp_path / 'again.jsonl'}", "batch_size=4"]) == 0
    again = [json.loads(line)["response"] for line in (tmp_path / "again.jsonl").read_text().splitlines()]
    assert again == [r["response"] for r in rows]


def compare_config(runs, prompts_file, tmp_path, **kw) -> CompareConfig:
    return CompareConfig(model_a=str(runs["sft"]), model_b=str(runs["ppo"]), dataset=[str(prompts_file)],
                         max_new_tokens=12, output_dir=str(tmp_path / "cmp"), **kw)


def test_compare_with_a_rule(runs, prompts_file, tmp_path):
    r = run_compare(compare_config(runs, prompts_file, tmp_path, reward_model="count_good"))
    ex = r["examples"]
    assert r["model_a"]["mean_reward"] == pytest.approx(sum(count_good("", e["response_a"], None) for e in ex) / 4)
    assert r["model_b"]["mean_reward"] == pytest.approx(sum(count_good("", e["response_b"], None) for e in ex) / 4)
    assert r["model_a"]["adapters"] == [str(runs["sft"])]
    assert r["model_b"]["adapters"] == [str(runs["sft"]), str(runs["ppo"])]
    assert r["model_a"]["failures"] == r["model_b"]["failures"] == 0 and r["pairs_scored"] == 4
    assert sum(r["b_vs_a"].values()) == pytest.approx(1.0)
    wins = sum(e["reward_b"] > e["reward_a"] for e in ex)
    assert r["b_vs_a_counts"]["win"] == wins

    out = tmp_path / "cmp"
    assert json.loads((out / "compare.json").read_text())["b_vs_a"] == r["b_vs_a"]
    page = (out / "compare.html").read_text()
    assert "Is this &lt;good&gt; &amp; fine?" in page and "<good>" not in page
    md = (out / "compare.md").read_text()
    assert "| model | sft | ppo |" in md and "Is this &lt;good&gt;" in md


def test_compare_with_the_judge_server_counts_failures(runs, prompts_file, tmp_path):
    judge = pytest.importorskip("alignkit.judge.server", reason="judge server module not available")
    # The first two requests fail (HTTP 500) and are not retried: two of A's four samples.
    server = judge.start_judge_server(rule="count_good", fault_first=2, fault_kinds=("500",))
    try:
        api = {"preset": "alignkit", "url": server.url_for("alignkit"), "max_retries": 0, "max_concurrency": 1}
        r = run_compare(compare_config(runs, prompts_file, tmp_path, reward_model_type="api", reward_api=api))
    finally:
        server.stop()
    assert r["model_a"]["failures"] == 2 and r["model_b"]["failures"] == 0
    assert r["pairs_with_failure"] == 2 and r["pairs_scored"] == 2
    ok = [e for e in r["examples"] if e["reward_a"] is not None]
    assert all(e["reward_a"] == count_good("", e["response_a"], None) for e in ok)
    assert r["model_a"]["mean_reward"] == pytest.approx(sum(e["reward_a"] for e in ok) / 2)  # failures are not 0s
    assert "failed:" in (tmp_path / "cmp" / "compare.md").read_text()


def test_chat_streams_keeps_history_and_resets(runs, monkeypatch, capsys):
    script = "How are you?\nSay something good.\n/reset\nHow are you?\n/exit\nnever read\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    args = ["chat", "--model", str(runs["base"]), "--adapter", str(runs["sft"]), "--max_new_tokens", "12"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "template chatml" in out and "(history cleared)" in out and out.rstrip().endswith("bye")
    answers = [line.removeprefix("User: ").removeprefix("Assistant: ") for line in out.splitlines()
               if "Assistant: " in line]
    assert len(answers) == 3
    assert answers[0] == answers[2]  # after /reset the same question sees the same (empty) history


def test_chat_function_with_history(runs):
    from alignkit.runs import build_spec
    from alignkit.tools.generator import Generator
    from alignkit.tools.infer import chat

    gen = Generator(build_spec(str(runs["ppo"])), "float32", "cpu")
    assert gen.spec.adapters == [str(runs["sft"]), str(runs["ppo"])]
    seen = []
    original = gen.prompt_ids
    gen.prompt_ids = lambda ex, cutoff: seen.append(len(ex.messages)) or original(ex, cutoff)
    stdout = io.StringIO()
    responses = chat(gen, io.StringIO("hi\nagain\n/reset\nhi\n"), stdout, max_new_tokens=8)
    assert seen == [1, 3, 1] and len(responses) == 3 and responses[0] == responses[2]
    assert all(r in stdout.getvalue() for r in responses)


def test_compare_and_predict_check_paths_before_loading_a_model(runs, prompts_file, tmp_path, monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the paths were checked")

    monkeypatch.setattr("alignkit.tools.compare.Generator", no_model)
    monkeypatch.setattr("alignkit.tools.infer.Generator", no_model)
    cfg = tmp_path / "compare.yaml"
    cfg.write_text(f"model_a: {runs['sft']}\nmodel_b: {tmp_path / 'missing'}\ndataset: {prompts_file}\n"
                   f"reward_model: count_good\noutput_dir: {tmp_path / 'cmp'}\n")
    # The compare command is registered by alignkit.tools.compare itself; model_b is checked before A generates.
    assert main(["compare", str(cfg)]) == 1
    assert "missing' is not a local directory" in capsys.readouterr().err
    cfg = tmp_path / "predict.yaml"
    cfg.write_text(f"model_name_or_path: {runs['base']}\nadapter_name_or_path: {runs['sft']},{tmp_path / 'nope'}\n"
                   f"dataset: {prompts_file}\noutput_file: {tmp_path / 'p.jsonl'}\n")
    assert main(["predict", str(cfg)]) == 1
    assert "adapter_name_or_path: " in capsys.readouterr().err
    assert main(["predict", str(cfg), f"adapter_name_or_path={runs['sft']}", f"output_file={tmp_path}"]) == 1
    assert "is a directory" in capsys.readouterr().err


def test_the_reward_prompt_is_the_last_user_turn():
    from alignkit.data.loader import Example

    ex = Example(messages=[{"role": "user", "content": "first"}, {"role": "assistant", "content": "a"},
                           {"role": "user", "content": "second"}, {"role": "tool", "content": "t"}], system="S")
    assert ex.last_user_text() == "second"
    assert Example(messages=[{"role": "tool", "content": "t"}]).last_user_text() == ""
