"""Metrics to JSONL (always), to the trackers of ``report_to`` through accelerate's tracker
integrations (TensorBoard, Weights & Biases, SwanLab, MLflow), and PNG plots."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from alignkit.config import REPORT_TO

METRICS_FILE = "metrics.jsonl"
# report_to name -> the package it needs (what to `pip install`); jsonl is always on, none adds nothing.
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "swanlab": "swanlab", "mlflow": "mlflow"}
NO_TRACKER = ("jsonl", "none")
PROJECT = "alignkit"  # W&B / SwanLab project and MLflow experiment unless their own environment variables say


def check_trackers(report_to: list[str]) -> None:
    """Raise ValueError for a name that is not a tracker, or a tracker whose package is not installed."""
    for name in report_to:
        if name in NO_TRACKER:
            continue
        if name not in TRACKER_PACKAGES:
            raise ValueError(f"report_to: unknown tracker {name!r}; choose from {', '.join(REPORT_TO)} (a list is fine)")
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            raise ValueError(f"report_to: {name} needs the {TRACKER_PACKAGES[name]!r} package: "
                             f"pip install {TRACKER_PACKAGES[name]} (or remove {name} from report_to)")


def build_tracker(name: str, out: Path, resume_step: int):
    """One accelerate tracker writing this run; started. Local defaults: TensorBoard under
    ``out/runs``, an MLflow file store under ``out/mlruns`` unless MLFLOW_TRACKING_URI is set,
    W&B and SwanLab files under ``out`` (their mode comes from WANDB_MODE / SWANLAB_MODE)."""
    from accelerate.tracking import MLflowTracker, SwanLabTracker, TensorBoardTracker, WandBTracker

    if name == "tensorboard":
        tracker = TensorBoardTracker("runs", out, purge_step=resume_step + 1 if resume_step else None)
    elif name == "wandb":
        tracker = WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), dir=str(out), name=out.name)
    elif name == "swanlab":
        tracker = SwanLabTracker(os.environ.get("SWANLAB_PROJECT", PROJECT), logdir=str(out / "swanlog"),
                                 experiment_name=out.name)
    else:
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):  # a local file store; MLflow 3 asks to allow it
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((out / "mlruns").resolve().as_uri())
        tracker = MLflowTracker(PROJECT, run_name=out.name)
    tracker.start()
    return tracker


class MetricLogger:
    """Writes one JSON line per logged step and the same scalars to every tracker of ``report_to``.

    Only the main process writes; other ranks get a logger whose calls do nothing.
    """

    def __init__(self, output_dir: str | Path, report_to: list[str], enabled: bool = True, resume_step: int = 0,
                 total_steps: int | None = None):
        self.enabled = enabled
        self.dir = Path(output_dir)
        self.trackers: list[Any] = []
        if not enabled:
            return
        check_trackers(report_to)
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / METRICS_FILE
        truncate_jsonl(path, resume_step)  # on resume the log reads as one run
        self.file = path.open("a")
        self.llamafactory = LlamaFactoryLogs(self.dir, resume_step, total_steps)
        self.trackers = [build_tracker(name, self.dir, resume_step) for name in report_to if name not in NO_TRACKER]

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self.file.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        self.file.flush()
        self.llamafactory.log(step, clean)
        finite = {k: v for k, v in clean.items() if math.isfinite(v)}
        for tracker in self.trackers:
            tracker.log(finite, step=step)

    def log_text(self, step: int, tag: str, text: str) -> None:
        """Markdown text (a samples table) to the trackers that show text (TensorBoard, W&B)."""
        for tracker in self.trackers:
            if tracker.name in ("tensorboard", "wandb"):
                tracker.log({tag: text}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        self.llamafactory.close()
        for tracker in self.trackers:
            tracker.finish()


# LLaMA-Factory's log files, beside metrics.jsonl, for LlamaBoard and the scripts users wrote for it.
TRAINER_LOG, TRAINER_STATE, ALL_RESULTS = "trainer_log.jsonl", "trainer_state.json", "all_results.json"
# trainer_log.jsonl's keys (its LogCallback) <- alignkit's metric names, first found wins (SFT/RM/DPO, then PPO).
TRAINER_LOG_KEYS = {
    "loss": ("train/loss", "ppo/loss/total"), "eval_loss": ("eval/loss",), "reward": ("env/reward_mean",),
    "accuracy": ("train/rewards/accuracies", "train/accuracy"), "lr": ("train/learning_rate", "ppo/learning_rate"),
    "epoch": ("train/epoch",),
}


def hf_name(key: str) -> str:
    """An alignkit metric under the Trainer's name in ``log_history`` (``train/loss`` -> ``loss``,
    ``eval/loss`` -> ``eval_loss``); other names (``ppo/...``, ``env/...``) are kept."""
    if key.startswith("train/"):
        return key.removeprefix("train/")
    return "eval_" + key.removeprefix("eval/") if key.startswith("eval/") else key


class LlamaFactoryLogs:
    """``trainer_log.jsonl`` live, in LLaMA-Factory's format (current_steps, total_steps, loss, lr,
    epoch, percentage, elapsed_time, remaining_time ...), and at the end ``trainer_state.json``
    (the Trainer's ``log_history``) and ``all_results.json`` (train_loss, train_runtime, eval_*)."""

    def __init__(self, out: Path, resume_step: int, total_steps: int | None):
        self.out, self.resume_step, self.total_steps = out, resume_step, total_steps
        self.start = time.time()
        self.history: list[dict[str, Any]] = []
        path = out / TRAINER_LOG
        if path.exists():  # on resume the log reads as one run, as metrics.jsonl does
            kept = [ln for ln in path.read_text().splitlines()
                    if ln and json.loads(ln).get("current_steps", 0) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.history.append({**{hf_name(k): v for k, v in metrics.items()}, "step": step})
        elapsed = time.time() - self.start
        total = self.total_steps or step
        per_step = elapsed / max(1, step - self.resume_step)
        line: dict[str, Any] = {"current_steps": step, "total_steps": total}
        for name, keys in TRAINER_LOG_KEYS.items():
            found = next((metrics[k] for k in keys if k in metrics), None)
            if found is not None:
                line[name] = found
        line |= {"percentage": round(step / total * 100, 2) if total else 100,
                 "elapsed_time": str(timedelta(seconds=int(elapsed))),
                 "remaining_time": str(timedelta(seconds=int(max(0, total - step) * per_step)))}
        with (self.out / TRAINER_LOG).open("a") as f:
            f.write(json.dumps(line) + "\n")

    def close(self) -> None:
        last_step = max((h["step"] for h in self.history), default=self.resume_step)
        epochs = [h["epoch"] for h in self.history if "epoch" in h]
        state = {"best_metric": None, "best_model_checkpoint": None, "epoch": epochs[-1] if epochs else None,
                 "global_step": last_step, "max_steps": self.total_steps or last_step, "is_world_process_zero": True,
                 "log_history": self.history, "total_flos": 0}
        (self.out / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")
        losses = [h["loss"] for h in self.history if "loss" in h]
        runtime = time.time() - self.start
        results: dict[str, Any] = {"epoch": state["epoch"], "train_runtime": round(runtime, 4),
                                   "train_steps_per_second": round((last_step - self.resume_step) / runtime, 3)}
        if losses:
            results["train_loss"] = sum(losses) / len(losses)
        for h in self.history:  # the latest value of each eval metric
            results |= {k: v for k, v in h.items() if k.startswith("eval_")}
        (self.out / ALL_RESULTS).write_text(json.dumps(results, indent=2) + "\n")


def truncate_jsonl(path: Path, resume_step: int) -> None:
    """Drop the lines of ``path`` logged after ``resume_step`` (no-op for a missing file)."""
    if path.exists():
        kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
        path.write_text("".join(ln + "\n" for ln in kept))


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def plot_metrics(run_dir: str | Path, keys: list[str] | None = None, out_name: str = "training_{}.png") -> list[Path]:
    """One PNG per metric (``training_loss.png`` ...), from the JSONL log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if not rows:
        return []
    keys = keys or sorted({k for r in rows for k in r if k not in ("step", "time")})
    written = []
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        xs, ys = zip(*pts, strict=False)
        ax.plot(xs, ys, alpha=0.4 if len(pts) > 20 else 1.0, label="raw")
        if len(pts) > 20:
            w = max(2, len(pts) // 10)
            smooth = [sum(ys[max(0, i - w + 1): i + 1]) / len(ys[max(0, i - w + 1): i + 1]) for i in range(len(ys))]
            ax.plot(xs, smooth, label="smoothed")
            ax.legend()
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(run_dir) / out_name.format(key.replace("/", "_"))
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
