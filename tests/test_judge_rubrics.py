"""Rubrics per dataset row (reward_api.criteria_column) and one judge call per criterion
(criteria_mode: per_criterion), against a real HTTP judge on 127.0.0.1 that scores each criterion
it is shown from a table, records every prompt and can be told to fail a criterion."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from types import SimpleNamespace

import pytest
from aiohttp import web
from pydantic import ValidationError

from alignkit.config import ConfigError, load_config
from alignkit.data.loader import load_examples
from alignkit.rewards.api.client import build_api_reward
from alignkit.rewards.api.config import parse_reward_api
from alignkit.rewards.api.criteria import listed_criteria
from alignkit.rewards.api.row_criteria import examples_criteria
from alignkit.rewards.base import ScoreMeta
from tests.conftest import EXAMPLES

CRITERIA = [{"name": "accuracy", "weight": 3, "description": "The answer is correct."},
            {"name": "brevity", "weight": 1, "description": "The answer is short."}]
SCORES = {"accuracy": 8, "brevity": 4, "cites": 10, "overall": 5}  # what the judge gives each criterion


class CriteriaJudge:
    """An OpenAI-style chat endpoint: ``{criterion: SCORES[criterion]}`` for the criteria a prompt lists;
    HTTP 500 when a listed criterion is in ``fail`` and the response contains ``fail_on``."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.calls: Counter[str] = Counter()  # criterion name -> requests that listed it
        self.usage = Counter()
        self.fail: set[str] = set()
        self.fail_on = ""
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        text = body["messages"][0]["content"]
        names = listed_criteria(text)
        self.prompts.append(text)
        self.calls.update(names)
        if self.fail & set(names) and self.fail_on in text:
            return web.Response(status=500, text="judge overloaded")
        reply = json.dumps({n: SCORES[n] for n in names})
        usage = {"prompt_tokens": len(text.split()), "completion_tokens": len(names)}
        self.usage.update(usage)
        return web.json_response({"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}],
                                  "usage": usage})

    def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]
        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        return f"http://127.0.0.1:{port}/v1/chat/completions"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)

    def reset(self) -> None:
        self.prompts.clear()
        self.calls.clear()
        self.usage.clear()
        self.fail, self.fail_on = set(), ""


@pytest.fixture(scope="module")
def server():
    srv = CriteriaJudge()
    srv.url = srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def judge(server):
    server.reset()
    return server


def reward(judge, **keys):
    return build_api_reward(parse_reward_api({"preset": "openai_judge", "url": judge.url, "model": "judge",
                                              "max_retries": 0, "score_range": [0, 10], **keys}))


def score(r, prompts, responses, meta=None):
    async def go():
        try:
            return await r.score(prompts, responses, meta)
        finally:
            await r.aclose()
    return asyncio.run(go())


def write_rows(path, rubrics):
    path.write_text("".join(json.dumps({"prompt": f"Question {i}?", **({"rubric": r} if r is not None else {})}) + "\n"
                            for i, r in enumerate(rubrics)))
    return path


def test_a_rows_rubric_reaches_the_judge_prompt_and_is_merged_with_the_global_one(judge, tmp_path):
    rows = write_rows(tmp_path / "rows.jsonl", [
        [{"name": "cites", "weight": 2, "description": "Cites the 1907 survey."}],  # added to the global two
        [{"name": "accuracy", "weight": 1, "description": "Matches the reference to 3 digits."}],  # replaces one
        None])  # no cell: the global rubric
    keys = {"criteria": CRITERIA, "criteria_column": "rubric"}
    r = reward(judge, **keys)
    examples = load_examples(str(rows), None, "prompt", keep_columns=("rubric",))
    meta = ScoreMeta(criteria=examples_criteria(SimpleNamespace(reward_model_type="api", reward_api=r.cfg), examples))
    got = score(r, [ex.last_user_text() for ex in examples], ["an answer"] * 3, meta)
    first, second, third = judge.prompts
    assert "- cites (weight 2): Cites the 1907 survey." in first and "- accuracy (weight 3)" in first
    assert "- accuracy (weight 1): Matches the reference to 3 digits." in second
    assert "The answer is correct." not in second and "- brevity (weight 1)" in second
    assert "cites" not in third
    # Weighted means over each row's own rubric.
    assert [s.value for s in got] == pytest.approx([(3 * 8 + 4 + 2 * 10) / 6, (8 + 4) / 2, (3 * 8 + 4) / 4])
    assert got[0].details == {"accuracy": 8.0, "brevity": 4.0, "cites": 10.0}


def test_bad_rubric_cells_are_reported_together_naming_file_row_and_column(tmp_path):
    rows = write_rows(tmp_path / "rows.jsonl", [
        [{"name": "ok", "description": "Fine."}], "not json", [{"name": "no description"}],
        [{"name": "x", "weight": -1, "description": "Negative."}], None])
    with pytest.raises(ConfigError) as e:
        load_config(None, check_paths=True, **{
            "stage": "ppo", "model_name_or_path": str(tmp_path), "dataset": str(rows), "output_dir": str(tmp_path / "o"),
            "reward_model_type": "api", "reward_api": {"preset": "openai_judge", "url": "http://127.0.0.1:9/v1",
                                                       "model": "judge", "criteria_column": "rubric"}})
    msg = str(e.value)
    for row in (1, 2, 3, 4):  # every bad row in one message; row 4 has no rubric and there is no global one
        assert f"{rows}: row {row}, column 'rubric':" in msg
    assert f"{rows}: row 0" not in msg and "4 row(s) with a bad rubric" in msg
    assert "not JSON" in msg and "criterion 0 description: Field required" in msg and "greater than 0" in msg
    assert "reward_api.criteria is not set" in msg


def test_per_criterion_asks_once_per_criterion_and_combines_with_the_weights(judge):
    r = reward(judge, criteria=CRITERIA, criteria_mode="per_criterion", price_per_million=1.0)
    got = score(r, ["a", "b", "c", "d"], ["w", "x", "y", "z"])
    assert judge.calls == {"accuracy": 4, "brevity": 4} and len(judge.prompts) == 8  # N calls per item
    assert all(len(listed_criteria(p)) == 1 for p in judge.prompts)
    assert [s.value for s in got] == [pytest.approx((3 * 8 + 4) / 4)] * 4
    assert got[0].details == {"accuracy": 8.0, "brevity": 4.0}
    m = r.metrics()
    assert m["reward/requests"] == 8 and m["judge/criterion/accuracy"] == 8 and m["judge/criterion/brevity"] == 4
    assert m["judge/prompt_tokens"] == judge.usage["prompt_tokens"]  # every criterion call is paid for
    assert m["judge/cost_usd"] == pytest.approx(sum(judge.usage.values()) / 1e6)


def test_a_failed_criterion_fails_its_sample_never_a_partial_mean(judge):
    judge.fail, judge.fail_on = {"brevity"}, "boom"
    r = reward(judge, criteria=CRITERIA, criteria_mode="per_criterion")
    good, bad = score(r, ["a", "b"], ["fine", "boom"])
    assert good.value == pytest.approx(7.0)
    assert bad.value is None and bad.reason.startswith("criterion 'brevity': HTTP 500")


def test_criteria_mode_config_errors():
    base = {"preset": "openai_judge", "url": "http://127.0.0.1:9/v1", "model": "judge"}
    with pytest.raises(ValidationError, match="criteria_mode: per_criterion needs"):
        parse_reward_api(base | {"criteria_mode": "per_criterion"})
    with pytest.raises(ValidationError, match="criteria_column"):
        parse_reward_api(base | {"criteria_column": "rubric", "judge_mode": "listwise"})
    assert parse_reward_api(base | {"criteria_column": "rubric"}).rubric.count("{criteria}") == 1


@pytest.mark.slow
def test_per_criterion_scores_reach_samples_and_the_report(tiny_model_dir, tmp_path, judge):
    from alignkit.report import write_report
    from alignkit.train import ppo
    from alignkit.train.tracking import read_metrics

    rows = write_rows(tmp_path / "rows.jsonl", [[{"name": "cites", "description": "Cites a source."}]] * 4)
    cfg = load_config(EXAMPLES / "ppo_tiny.yaml", [
        f"model_name_or_path={tiny_model_dir}", "adapter_name_or_path=null", f"output_dir={tmp_path / 'run'}",
        f"dataset={rows}", "report_to=none", "plot_loss=false", "seed=0", "per_device_train_batch_size=2",
        "ppo_buffer_size=2", "ppo_epochs=1", "max_new_tokens=4", "max_steps=1", "reward_model_type=api",
        f"reward_model={judge.url}", "judge_canaries=false"],
        reward_api={"preset": "openai_judge", "model": "judge", "score_range": [0, 10], "max_retries": 0,
                    "criteria": CRITERIA, "criteria_column": "rubric", "criteria_mode": "per_criterion"})
    out = ppo.run(cfg)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["criteria"] == {"accuracy": 8.0, "brevity": 4.0, "cites": 10.0} for s in samples)
    assert read_metrics(out)[0]["judge/criterion/cites"] == 10
    html = write_report(out).read_text()
    assert "<th>criteria</th>" in html and "cites&nbsp;10" in html


def test_criterion_scores_follow_their_samples_through_merges_and_selection():
    from alignkit.train.ppo.experience import RolloutStats
    from alignkit.train.ppo.samples import score_text

    a = RolloutStats(failure_reasons=[None, "HTTP 500"], score_details=[{"accuracy": 8.0}, None])
    b = RolloutStats(failure_reasons=[None])  # a round scored by a source without criteria
    merged = a.merge(b)
    assert merged.score_details == [{"accuracy": 8.0}, None, None]
    assert merged.rows([2, 0]).score_details == [None, {"accuracy": 8.0}]
    assert RolloutStats(failure_reasons=[None]).merge(b).score_details == []
    assert score_text({"score": 7.0, "failure": None, "criteria": {"accuracy": 8.0, "brevity": 4.0}}) == \
        "7 (accuracy 8, brevity 4)"
    assert score_text({"score": None, "failure": "HTTP 500"}) == "failed"


def test_tied_scores_pick_each_sample_once():
    import torch

    from alignkit.train.ppo.samples import pick_samples

    picks = pick_samples(torch.full((8,), 10.0), torch.ones(8), 8)  # a judge that gave every answer 10
    assert sorted(i for i, _ in picks) == list(range(8))
