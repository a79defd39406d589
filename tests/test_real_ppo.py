"""PPO with a critic against a judge over HTTP, on the real model: SmolLM2-135M-Instruct.

A judge server on 127.0.0.1 scores "Describe TOPIC in at most ten words." with ``brief_judge``
(tests/real_task.py): graded by length, zero for the prompt echoed back or an answer without the
topic, so the run's judge canaries (":", "", the echo, "Let me solve this step by step.") score
below the real answers. PPO (LoRA policy, the critic on its own adapter, GAE, scores normalised,
adaptive KL) trains for STEPS steps. Asserted, with the bars fixed before the first run:

- reward rises: the mean of the last EDGE steps >= 1.25x the first EDGE steps' and >= first + 0.05;
- the run's report (alignkit.report) has no warn and no fail (KL band, entropy, value loss, length,
  canaries, failures, ...);
- KL per token stays under the report's KL_FAIL (0.2) at every step;
- no degenerate text: repeated 3-grams of the last steps <= the first steps' (the base model's
  answers: the LoRA starts at zero) + 0.01, distinct-2 >= 0.8x the first steps'.

Measured (seed 0, 1 thread; the run is deterministic, and `alignkit demo --real` with the same recipe
gave the same figures): reward per step 0.283 0.215 0.233 0.365 0.579 0.329 0.561 0.433 0.315 0.350,
first 3 -> last 3 0.244 -> 0.366 (1.50x); KL/token max 0.065, last-third median 0.033; repeated 3-grams
0.010 -> 0.006; distinct-2 0.934 -> 0.938; length 23.5 -> 17.0 tokens; report: every check ok. 5.9 min
wall (5.6 min CPU) on 2 shared cores: over the ~4 min aimed at (the three learning tests together take
14.8 min in CI on 2 cores, over the ~12 aimed at).
"""

from __future__ import annotations

import json
from statistics import mean

from alignkit.config import load_config
from alignkit.judge.process import JudgeProcess
from alignkit.models.gguf import convert_gguf
from alignkit.report import write_report
from alignkit.report.health import KL_FAIL
from alignkit.tools.demo_real import JUDGE_RULE, REAL_PPO, judge_settings
from alignkit.train import ppo
from alignkit.train.tracking import read_metrics
from tests import real_task

GGUF, pytestmark = real_task.smollm2_and_marks()

STEPS, EDGE = 10, 3
RECIPE = [*REAL_PPO, f"max_steps={STEPS}"]  # alignkit demo --real's recipe


def test_ppo_with_a_critic_against_the_http_judge_raises_reward_with_a_healthy_report(tmp_path):
    with JudgeProcess(rule=JUDGE_RULE, log=tmp_path / "judge.log") as judge:
        run = ppo.run(load_config(None, [
            "stage=ppo", f"model_name_or_path={convert_gguf(GGUF)}", "template=auto", "dataset=brief",
            f"dataset_dir={real_task.write_dataset(tmp_path / 'data')}", "finetuning_type=lora",
            f"output_dir={tmp_path / 'run'}", "report_to=none", "plot_loss=false", "save_steps=1000",
            "reward_model_type=api", *RECIPE], **judge_settings(judge.url)))
    metrics = [m for m in read_metrics(run) if "env/reward_mean" in m]
    write_report(run)
    health = json.loads((run / "report" / "health.json").read_text())
    first, last = metrics[:EDGE], metrics[-EDGE:]

    def avg(rows, key):
        return mean(m[key] for m in rows)

    kl_per_token = [m["objective/kl"] / max(m["rollout/response_len_mean"], 1.0) for m in metrics]
    r_first, r_last = avg(first, "env/reward_mean"), avg(last, "env/reward_mean")
    print(f"reward per step: {[round(m['env/reward_mean'], 3) for m in metrics]}")
    print(f"reward {r_first:.3f} -> {r_last:.3f}; KL/token max {max(kl_per_token):.4f} last {kl_per_token[-1]:.4f}; "
          f"repeat-3gram {avg(first, 'rollout/repeat_3gram_frac'):.3f} -> {avg(last, 'rollout/repeat_3gram_frac'):.3f}; "
          f"distinct-2 {avg(first, 'rollout/distinct_2'):.3f} -> {avg(last, 'rollout/distinct_2'):.3f}; length "
          f"{avg(first, 'rollout/response_len_mean'):.1f} -> {avg(last, 'rollout/response_len_mean'):.1f} tokens")
    print("health:", {c["name"]: (c["verdict"], c["detail"]) for c in health["checks"]})
    assert len(metrics) == STEPS
    assert r_last >= 1.25 * r_first and r_last >= r_first + 0.05, (r_first, r_last)
    assert {c["name"]: c["verdict"] for c in health["checks"] if c["verdict"] in ("warn", "fail")} == {}
    assert max(kl_per_token) < KL_FAIL
    assert avg(last, "rollout/repeat_3gram_frac") <= avg(first, "rollout/repeat_3gram_frac") + 0.01
    assert avg(last, "rollout/distinct_2") >= 0.8 * avg(first, "rollout/distinct_2")
