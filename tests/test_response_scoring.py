"""Each response goes to the reward service as soon as it is finished (issue 27 item 2): a real judge
server on 127.0.0.1 receives a batch's first responses while the hf engine is still decoding the
rest of it, and every sample is scored once. tests/test_vllm_server.py checks that the vllm_server
engine hands on each response as its request returns; tests/test_judge_group.py that listwise
judges still get whole groups."""

from __future__ import annotations

import threading

from alignkit.generation import HFEngine
from alignkit.judge.server import start_judge_server
from alignkit.rewards.rules import count_good
from alignkit.train import ppo
from alignkit.train.tracking import read_metrics
from tests.test_critic_free import grpo_config


def test_judge_hears_of_responses_before_the_batch_is_sampled(tiny_model_dir, sft_adapter, tmp_path, monkeypatch):
    # In order: ("start", rows), ("finished", row), ("judge", n responses), ("returned", rows)
    events: list[tuple] = []
    heard = threading.Event()

    def scorer(prompts, responses, labels):  # the judge server's own scoring, on its thread
        events.append(("judge", len(responses)))
        heard.set()
        return [count_good(p, r, lb) for p, r, lb in zip(prompts, responses, labels, strict=True)]

    real = HFEngine.generate

    def instrumented(self, query_ids, query_mask, sampling, pixels=None, on_finished=None):
        heard.clear()
        events.append(("start", query_ids.shape[0]))

        def finished(row, ids):
            events.append(("finished", row))
            on_finished(row, ids)
            # Hold the decode until the judge has the response: were it submitted only with the
            # whole batch, the judge would hear nothing now and the assertions below would fail.
            heard.wait(30)

        roll = real(self, query_ids, query_mask, sampling, pixels, finished if on_finished else None)
        events.append(("returned", query_ids.shape[0]))
        return roll

    monkeypatch.setattr(HFEngine, "generate", instrumented)
    with start_judge_server(scorer) as judge:
        out = ppo.run(grpo_config(tiny_model_dir, sft_adapter, tmp_path / "run", "count_good",
                                  "reward_model_type=api", f"reward_model={judge.url_for('alignkit')}",
                                  "reward_api.max_retries=0", "reward_api.cache=null", "judge_canaries=false",
                                  "reward_api.health_check=false",
                                  "max_steps=2", "max_new_tokens=24", "seed=0"))
        stats = judge.stats.snapshot()
    starts = [i for i, e in enumerate(events) if e[0] == "start"]
    batches = [events[i : events.index(("returned", events[i][1]), i) + 1] for i in starts]
    assert len(batches) == 2
    for batch in batches:  # what happened while the engine sampled one batch
        kinds, n_rows = [k for k, _ in batch], batch[-1][1]
        assert "judge" in kinds, batch  # the judge scored a response of this batch before the engine returned ...
        assert kinds[: kinds.index("judge")].count("finished") < n_rows, batch  # ... while other rows still decoded
    rows = read_metrics(out)
    assert sum(r["reward/requests"] for r in rows) == stats["requests"]
    assert stats["items"] <= 2 * 32 and stats["requests"] == stats["items"]  # one sample per request, each once
    assert all(r["reward/failures"] == 0 for r in rows)

