"""``alignkit report``: health checks on synthetic logs with known pathologies, and the HTML itself."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import yaml

from alignkit.cli import main
from alignkit.report import write_report
from alignkit.report.health import NA, OK
from alignkit.report.render import report_health

SECRET = "sk-planted-secret-123"
N_STEPS = 60
PPO_CONFIG = {
    "stage": "ppo", "model_name_or_path": "tiny", "output_dir": "out", "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 2, "ppo_buffer_size": 2, "max_new_tokens": 128,  # rollout batch 16
    "reward_model_type": "api", "reward_api": {"url": "http://127.0.0.1:9/score",
                                               "headers": {"Authorization": f"Bearer {SECRET}"}},
}


def healthy(t: float, noise: float) -> dict[str, float]:
    """One PPO step at run fraction ``t`` in [0, 1]: reward rises, KL settles in band, entropy eases."""
    length = 40 + 10 * t
    kl_tok = 0.03 * min(1.0, 3 * t)
    entropy = 2.0 - 0.5 * t
    value_loss = math.exp(-3 * t) + 0.1
    return {
        "env/reward_mean": 0.2 + 1.0 * t + 0.05 * noise, "env/reward_std": 1.0,
        "objective/kl": kl_tok * length, "objective/kl_coef": 0.2, "objective/entropy": entropy * length,
        "ppo/loss/policy": 0.01 * noise, "ppo/loss/value": value_loss, "ppo/loss/total": 0.1 * value_loss,
        "ppo/policy/approxkl": 0.01, "ppo/policy/clipfrac": 0.1 + 0.02 * noise, "ppo/policy/entropy": entropy,
        "ppo/returns/mean": 0.5 * t, "ppo/val/mean": 0.45 * t, "ppo/val/clipfrac": 0.05,
        "ppo/val/explained_variance": 0.6 * t, "rollout/response_len_mean": length, "rollout/no_eos_frac": 0.02,
        "reward/failures": 0.0, "reward/cache_hits": 0.0, "reward/latency_p50": 0.3, "reward/latency_p95": 0.8,
        "time/rollout": 2.0, "time/generate": 1.5, "time/score_wait": 0.2, "time/update": 1.0, "time/step": 3.2,
        "perf/tokens_per_s": 200.0, "perf/peak_rss_mb": 1500.0,
        "rollout/repeat_3gram_frac": 0.02, "rollout/distinct_2": 0.7, "rollout/score_len_corr": 0.2 * noise,
        "probe/score_mean": 0.8,
    }


# Pathology -> (change to a healthy step, the checks that must flag it).
PATHOLOGIES = {
    "kl_exploding": (lambda t, r: {"objective/kl": (0.03 + 0.5 * t) * r["rollout/response_len_mean"]}, {"kl_band"}),
    "entropy_collapse": (lambda t, r: {"ppo/policy/entropy": 2.0 * (1 - t) + 0.005}, {"entropy"}),
    "high_clipfrac": (lambda t, r: {"ppo/policy/clipfrac": 0.45}, {"clipfrac"}),
    "reward_collapse": (lambda t, r: {"env/reward_mean": 0.2 + 2 * t if t < 0.5 else -1.0}, {"reward_trend"}),
    "api_failures": (lambda t, r: {"reward/failures": 3.0}, {"reward_failures"}),  # 3 / 16 per step
    "length_explosion": (lambda t, r: {"rollout/response_len_mean": min(128.0, 40 + 300 * t),
                                       "objective/kl": 0.03 * min(128.0, 40 + 300 * t),
                                       "rollout/no_eos_frac": min(0.9, 3 * t)}, {"response_length", "no_eos"}),
    # Reward hacking: the score follows length while answers grow; "good good good"; one answer for all.
    "length_hacking": (lambda t, r: {"rollout/response_len_mean": 40 + 40 * t, "objective/kl": 0.03 * (40 + 40 * t),
                                     "rollout/score_len_corr": 0.95}, {"score_length"}),
    "repetition": (lambda t, r: {"rollout/repeat_3gram_frac": 0.02 + 0.5 * t}, {"repetition"}),
    "mode_collapse": (lambda t, r: {"rollout/distinct_2": 0.7 - 0.6 * t}, {"diversity"}),
    "judge_drift": (lambda t, r: {"probe/score_mean": 0.8 if t < 0.5 else 0.5}, {"reward_probe"}),
    "outscoring_references": (lambda t, r: {"probe/score_mean": -2.0}, {"reward_probe"}),
}


def write_run(run_dir: Path, rows: list[dict[str, float]], config: dict | None = PPO_CONFIG) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "metrics.jsonl").open("w") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps({"step": i + 1, "time": 1000.0 + 3.2 * i, **row}) + "\n")
    if config is not None:
        (run_dir / "alignkit_config.yaml").write_text(yaml.safe_dump(config))
    return run_dir


def ppo_rows(n: int = N_STEPS, change=None) -> list[dict[str, float]]:
    rng = random.Random(0)
    rows = []
    for i in range(n):
        t = i / max(1, n - 1)
        row = healthy(t, rng.uniform(-1, 1))
        if change is not None:
            row.update(change(t, row))
        rows.append(row)
    return rows


def flagged(run_dir: Path) -> set[str]:
    _, checks = report_health(run_dir)
    return {c.name for c in checks if c.verdict not in (OK, NA)}


def test_healthy_ppo_run_flags_nothing_and_html_is_self_contained(tmp_path):
    run_dir = write_run(tmp_path / "run", ppo_rows())
    assert flagged(run_dir) == set()
    path = write_report(run_dir)
    text = path.read_text()
    assert path == run_dir / "report.html"
    assert text.count("data:image/png;base64,") >= 20
    assert 'src="http' not in text and "<link" not in text and "<script" not in text
    assert SECRET not in text and "REDACTED" in text and "per_device_train_batch_size: 4" in text
    assert "reward_trend" in text and "Healthy:" in text  # checks and plain-language captions
    assert (run_dir / "report" / "env_reward_mean.png").read_bytes()[:4] == b"\x89PNG"
    assert "50%" in text or "of a step" in text  # timing split
    health = json.loads((run_dir / "report" / "health.json").read_text())
    assert health["verdict"] == "ok" and all(c["verdict"] != NA for c in health["checks"]
                                             if c["name"] != "think_truncated")


@pytest.mark.parametrize("name", sorted(PATHOLOGIES))
def test_pathology_flags_exactly_its_checks(tmp_path, name):
    change, expected = PATHOLOGIES[name]
    assert flagged(write_run(tmp_path / name, ppo_rows(change=change))) == expected


def test_severity_follows_thresholds(tmp_path):
    _, checks = report_health(write_run(tmp_path / "a", ppo_rows(change=lambda t, r: {"reward/failures": 6.0})))
    assert {c.name: c.verdict for c in checks}["reward_failures"] == "fail"  # 6/16 > 0.2
    _, checks = report_health(write_run(tmp_path / "b", ppo_rows(change=PATHOLOGIES["kl_exploding"][0])))
    kl = {c.name: c for c in checks}["kl_band"]
    assert kl.verdict == "fail" and "nats/token" in kl.detail


def test_ppo_report_shows_sample_tables_and_the_reward_kl_frontier(tmp_path):
    run_dir = write_run(tmp_path / "samples", ppo_rows(30))
    with (run_dir / "samples.jsonl").open("w") as f:
        for step in (1, 15, 30):
            for pick, score in (("best", step / 3), ("worst", -1.0 - step), ("spread", 0.5)):
                f.write(json.dumps({"step": step, "pick": pick, "prompt": "<Hi & bye>", "response": f"answer {step} {pick}",
                                    "score": score, "failure": None, "kl": 0.1 * step, "length": 7}) + "\n")
        f.write('{"step": 30, "pick": "spread", "prompt": "p", "response": "cut off mid-li')  # a killed run
    text = write_report(run_dir).read_text()
    for title in ("start of the run (step 1)", "middle of the run (step 15)", "end of the run (step 30)",
                  "highest scored", "lowest scored"):
        assert title in text
    assert "&lt;Hi &amp; bye&gt;" in text and "<Hi & bye>" not in text  # escaped
    top = text.split("highest scored")[1].split("lowest scored")[0]
    assert "answer 30 best" in top and "answer 30 worst" not in top
    assert (run_dir / "report" / "reward_vs_kl.png").read_bytes()[:4] == b"\x89PNG"
    assert "frontier a user tunes" in text


def test_short_run_with_nan_still_reports(tmp_path):
    keep = ("env/reward_mean", "objective/kl", "rollout/response_len_mean", "ppo/loss/value", "time/step")
    rows = [{k: row[k] for k in keep} for row in ppo_rows(2)]
    rows[1]["ppo/loss/value"] = float("nan")
    run_dir = write_run(tmp_path / "short", rows)
    _, checks = report_health(run_dir)
    verdicts = {c.name: c.verdict for c in checks}
    assert verdicts["non_finite"] == "fail"
    assert verdicts["reward_trend"] == verdicts["kl_band"] == NA  # too short to judge a trend
    assert verdicts["clipfrac"] == NA  # not logged is n/a, not ok
    text = write_report(run_dir).read_text()
    assert "NaN/inf value(s) not drawn" in text and "data:image/png;base64," in text


def test_sft_run_reports_loss_curve(tmp_path):
    rows = [{"train/loss": 2.5 * math.exp(-i / 20) + 0.5, "train/learning_rate": 1e-4, "time/step": 0.5}
            for i in range(30)]
    for i in range(0, 30, 10):
        rows[i]["eval/loss"] = 2.0 - 0.02 * i
    run_dir = write_run(tmp_path / "sft", rows, {"stage": "sft", "output_dir": "out", "api_key": SECRET})
    text = write_report(run_dir).read_text()
    assert (run_dir / "report" / "train_loss.png").exists() and "train/loss" in text
    assert SECRET not in text
    _, checks = report_health(run_dir)
    assert {c.name: c.verdict for c in checks} == {"loss_trend": "ok", "non_finite": "ok"}


def test_rm_run_near_chance_fails_accuracy(tmp_path):
    rows = [{"train/loss": 0.69, "train/accuracy": 0.5, "eval/accuracy": 0.51} for _ in range(10)]
    assert flagged(write_run(tmp_path / "rm", rows, {"stage": "rm"})) == {"rm_accuracy"}


def test_tensorboard_only_run_reports(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    run_dir = tmp_path / "tb"
    writer = SummaryWriter(log_dir=str(run_dir / "runs"))
    for i, row in enumerate(ppo_rows(12)):
        for key in ("env/reward_mean", "objective/kl", "rollout/response_len_mean", "ppo/policy/clipfrac"):
            writer.add_scalar(key, row[key], i + 1)
    writer.close()
    text = write_report(run_dir).read_text()
    assert "TensorBoard events" in text and "data:image/png;base64," in text
    _, checks = report_health(run_dir)
    verdicts = {c.name: c.verdict for c in checks}
    assert verdicts["clipfrac"] == verdicts["kl_band"] == OK and verdicts["entropy"] == NA


def test_cli_report(tmp_path, capsys):
    run_dir = write_run(tmp_path / "cli", [{"train/loss": 1.0 + 0.2 * i} for i in range(20)], {"stage": "sft"})
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "fail  loss_trend" in out and (run_dir / "report.html").exists()
    assert main(["report", "--strict", str(run_dir)]) == 1
    assert main(["report", str(tmp_path / "missing")]) == 1


def test_is_weights_check_flags_ratios_drifting_from_one():
    from alignkit.report.data import Series
    from alignkit.report.health import check_is_weights

    steps = list(range(1, 13))
    near = {"is/ratio_mean": Series(steps, [1.0 + 0.01 * (-1) ** i for i in steps]),
            "is/clipped_frac": Series(steps, [0.01] * 12)}
    assert check_is_weights(near, {}).verdict == "ok"
    drifting = {**near, "is/ratio_mean": Series(steps, [1.0] * 8 + [1.7] * 4)}
    check = check_is_weights(drifting, {})
    assert check.verdict == "fail" and "async_level" in check.detail
    clipped = {**near, "is/clipped_frac": Series(steps, [0.0] * 8 + [0.1] * 4)}
    assert check_is_weights(clipped, {}).verdict == "warn"
    assert check_is_weights({}, {}) is None  # an on-policy run has no such check
