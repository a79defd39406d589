"""report_to: each tracker that runs offline receives the metrics, through accelerate's integrations."""

from __future__ import annotations

import time

import pytest

from alignkit.config import ConfigError, load_config
from alignkit.train import tracking
from alignkit.train.tracking import MetricLogger, check_trackers, read_metrics

STEPS = {1: {"env/reward_mean": 0.5, "objective/kl": 0.1}, 2: {"env/reward_mean": 0.75, "objective/kl": 0.2}}


def log_run(out, report_to: list[str]) -> None:
    logger = MetricLogger(out, report_to)
    for step, metrics in STEPS.items():
        logger.log(step, metrics)
    logger.log_text(2, "samples", "| prompt | response |\n|---|---|\n| hi | hello |")
    logger.close()
    assert [r["env/reward_mean"] for r in read_metrics(out)] == [0.5, 0.75]  # JSONL is always on


def test_tensorboard_receives_scalars_and_text(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator as ea

    log_run(tmp_path, ["tensorboard"])
    acc = ea.EventAccumulator(str(tmp_path / "runs"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("env/reward_mean")] == [0.5, 0.75]
    assert "samples/text_summary" in acc.Tags()["tensors"]


def test_wandb_offline_receives_scalars(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log_run(tmp_path, ["wandb"])
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")  # what `wandb sync` would upload
    # wandb ships no public reader for the file; its history records hold the keys and JSON values as text.
    deadline = time.monotonic() + 30
    while (data := run_file.read_bytes()).count(b"env/reward_mean") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)  # wandb's service process may still be writing after finish() returns
    assert data.count(b"env/reward_mean") >= 2 and b"0.75" in data and b"objective/kl" in data


def test_mlflow_local_file_store_receives_scalars(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    log_run(tmp_path, ["mlflow"])
    client = mlflow.MlflowClient((tmp_path / "mlruns").resolve().as_uri())
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    history = client.get_metric_history(runs[0].info.run_id, "env/reward_mean")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.75)]


def test_swanlab_local_mode_writes_its_log(tmp_path, monkeypatch):
    pytest.importorskip("swanlab")
    monkeypatch.setenv("SWANLAB_MODE", "local")
    log_run(tmp_path, ["swanlab"])
    assert any((tmp_path / "swanlog").rglob("*")), "swanlab wrote nothing under swanlog/"


def test_unknown_tracker_is_a_config_error_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'wandb'"):
        load_config(None, [f"output_dir={tmp_path}", "report_to=wandbb"], stage="sft", model_name_or_path="m",
                    dataset="d")


def test_uninstalled_tracker_names_the_package(monkeypatch):
    monkeypatch.setitem(tracking.TRACKER_PACKAGES, "wandb", "alignkit_no_such_package")
    with pytest.raises(ValueError, match="pip install alignkit_no_such_package"):
        check_trackers(["tensorboard", "wandb"])


def test_llamafactory_trainer_log_for_ppo_and_on_resume(tmp_path):
    """PPO's loss and mean reward under LLaMA-Factory's keys; a resumed run's log reads as one run."""
    import json

    ppo = {"ppo/loss/total": 0.25, "env/reward_mean": 0.5, "ppo/learning_rate": 1e-5}
    logger = MetricLogger(tmp_path, ["jsonl"], total_steps=4)
    for step in (1, 2, 3):
        logger.log(step, ppo)
    logger.close()
    logger = MetricLogger(tmp_path, ["jsonl"], resume_step=2, total_steps=4)  # resumed from checkpoint-2
    for step in (3, 4):
        logger.log(step, ppo)
    logger.close()
    lines = [json.loads(ln) for ln in (tmp_path / "trainer_log.jsonl").read_text().splitlines()]
    assert [ln["current_steps"] for ln in lines] == [1, 2, 3, 4]
    assert lines[-1] | {"elapsed_time": "", "remaining_time": ""} == {
        "current_steps": 4, "total_steps": 4, "loss": 0.25, "reward": 0.5, "lr": 1e-5, "percentage": 100.0,
        "elapsed_time": "", "remaining_time": ""}
