"""The reward probe's rank agreement with its first probe (probe/spearman_vs_first) and its report check."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from alignkit.config import load_config
from alignkit.judge.server import start_judge_server
from alignkit.report import write_report
from alignkit.rewards.drift import RankDrift, ranks, spearman
from alignkit.train import ppo
from alignkit.train.tracking import read_metrics
from tests.conftest import EXAMPLES


def test_spearman_with_ties_and_failures():
    assert ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 2], [1, 2])) and math.isnan(spearman([1, 2, 3], [5, 5, 5]))
    drift = RankDrift()
    assert drift([1.0, 2.0, 3.0, None]) == pytest.approx(1.0)
    assert drift([3.0, 2.0, 1.0, 9.0]) == pytest.approx(-1.0)  # the row that failed at first is left out


@pytest.mark.slow
def test_a_judge_that_reorders_the_probe_fails_the_rank_check(tiny_model_dir, tmp_path):
    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps({"prompt": f"Q{i}", "response": f"reference {i}"}) + "\n" for i in range(5)))
    seen: Counter[str] = Counter()

    def fickle(prompts, responses, labels):
        # Probe answers: scored i the first time, -i after (the same answers, the opposite order).
        out = []
        for r in responses:
            if r.startswith("reference "):
                seen[r] += 1
                out.append(float(r.split()[1]) * (1 if seen[r] == 1 else -1))
            else:
                out.append(1.0)
        return out

    with start_judge_server(fickle) as judge:
        cfg = load_config(EXAMPLES / "ppo_tiny.yaml", [
            f"model_name_or_path={tiny_model_dir}", "adapter_name_or_path=null", f"output_dir={tmp_path / 'run'}",
            f"dataset_dir={EXAMPLES / 'data'}", "report_to=none", "plot_loss=false", "seed=0",
            "per_device_train_batch_size=2", "ppo_buffer_size=2", "ppo_epochs=1", "max_new_tokens=8", "max_steps=2",
            "reward_model_type=api", f"reward_model={judge.url_for('alignkit')}", "reward_api.preset=alignkit",
            "judge_canaries=false",
            f"reward_probe={probe}", "reward_probe_every=1"])
        out = ppo.run(cfg)
    rows = read_metrics(out)
    assert [r["probe/spearman_vs_first"] for r in rows] == [pytest.approx(1.0), pytest.approx(-1.0)]
    write_report(out)
    checks = {c["name"]: c for c in json.loads((out / "report" / "health.json").read_text())["checks"]}
    assert checks["probe_rank_agreement"]["verdict"] == "fail"
    assert "lowest -1.00 (step 2)" in checks["probe_rank_agreement"]["detail"]
