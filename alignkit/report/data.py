"""A run's logged metrics and resolved config, read from ``metrics.jsonl`` or TensorBoard events."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alignkit.config import redact
from alignkit.train.tracking import METRICS_FILE, read_metrics

logger = logging.getLogger(__name__)
CONFIG_FILE = "alignkit_config.yaml"
SAMPLES_FILE = "samples.jsonl"  # written by alignkit.train.ppo.samples (the report does not import the trainer)


@dataclass
class Series:
    """One metric over the run, sorted by step; ``values`` may hold NaN/inf."""

    steps: list[int]
    values: list[float]

    def finite(self) -> list[float]:
        return [v for v in self.values if math.isfinite(v)]


@dataclass
class Run:
    run_dir: Path
    stage: str  # "ppo" | "sft" | "rm" | "dpo" | "kto" | "unknown"
    metrics: dict[str, Series]
    wall_times: list[float]  # one wall-clock time (s since epoch) per logged step, in step order
    config: dict[str, Any] = field(default_factory=dict)  # redacted, for display; empty when the run has none
    # Top-level numeric keys of the config, read before redaction: redact() hides any key matching
    # "token", max_new_tokens included, and the checks need those numbers.
    settings: dict[str, float] = field(default_factory=dict)
    source: str = METRICS_FILE
    samples: list[dict[str, Any]] = field(default_factory=list)  # samples.jsonl rows (PPO), in step order


def load_run(run_dir: str | Path) -> Run:
    """Metrics from ``metrics.jsonl`` (or, without it, TensorBoard event files) plus the config."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    rows, source = _read_jsonl(run_dir), METRICS_FILE
    if not rows:
        rows, source = _read_tensorboard(run_dir), "TensorBoard events"
    if not rows:
        raise FileNotFoundError(
            f"{run_dir}: no {METRICS_FILE} and no TensorBoard event files; pass the output_dir of a training run"
        )
    by_step: dict[int, dict[str, float]] = {}
    for row in rows:  # a repeated step keeps its last values
        by_step.setdefault(int(row["step"]), {}).update(row)
    steps = sorted(by_step)
    metrics: dict[str, Series] = {}
    for step in steps:
        for key, value in by_step[step].items():
            if key in ("step", "time") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            s = metrics.setdefault(key, Series([], []))
            s.steps.append(step)
            s.values.append(float(value))
    wall = [float(by_step[s]["time"]) for s in steps if isinstance(by_step[s].get("time"), (int, float))]
    raw = _read_config(run_dir)
    settings = {k: float(v) for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    config = redact(raw)  # the trainer already redacts; again, so a hand-edited file cannot leak a secret
    run = Run(run_dir, _stage(config, metrics), metrics, wall, config, settings, source, read_samples(run_dir))
    add_derived(run)
    return run


def read_samples(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``samples.jsonl`` that parse (a run killed mid-write leaves a partial line)."""
    path = run_dir / SAMPLES_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in rows if isinstance(r, dict) and "step" in r]


def rollout_batch_size(settings: dict[str, float]) -> int | None:
    """Prompts per PPO step (per rank), as PPOConfig computes it; None without a config."""
    if not settings:
        return None
    keys = ("per_device_train_batch_size", "gradient_accumulation_steps", "ppo_buffer_size")
    return math.prod(int(settings.get(k, 1)) for k in keys)


def add_derived(run: Run) -> None:
    """Series the checks and plots need that the trainer does not log directly."""
    m = run.metrics
    if "objective/kl" in m and "rollout/response_len_mean" in m:
        # The KL rule of thumb (~0.01-0.05) is per token; objective/kl is summed over the response.
        m["objective/kl_per_token"] = ratio_series(m["objective/kl"], m["rollout/response_len_mean"])
    batch = rollout_batch_size(run.settings)
    if "reward/failures" in m and "reward/failure_rate" not in m and batch:
        f = m["reward/failures"]
        m["reward/failure_rate"] = Series(list(f.steps), [v / batch for v in f.values])


def ratio_series(num: Series, den: Series) -> Series:
    """``num / den`` at the steps both logged (NaN where ``den`` is not positive)."""
    den_at = dict(zip(den.steps, den.values, strict=True))
    steps, values = [], []
    for step, v in zip(num.steps, num.values, strict=True):
        d = den_at.get(step)
        if d is not None:
            steps.append(step)
            values.append(v / d if d > 0 else math.nan)
    return Series(steps, values)


def _read_jsonl(run_dir: Path) -> list[dict[str, Any]]:
    try:
        return read_metrics(run_dir)
    except json.JSONDecodeError:
        # A run killed mid-write leaves a partial last line; keep every line that parses.
        rows = []
        for n, line in enumerate((run_dir / METRICS_FILE).read_text().splitlines(), 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s line %d is not JSON; skipped", run_dir / METRICS_FILE, n)
        return [r for r in rows if isinstance(r, dict) and "step" in r]


def _read_tensorboard(run_dir: Path) -> list[dict[str, Any]]:
    """Rows shaped like metrics.jsonl from every event file under ``run_dir`` (non-finite values are not in TB)."""
    dirs = sorted({p.parent for p in run_dir.rglob("events.out.tfevents*")})
    if not dirs:
        return []
    from tensorboard.backend.event_processing import event_accumulator as ea

    rows: dict[int, dict[str, Any]] = {}
    for d in dirs:
        acc = ea.EventAccumulator(str(d), size_guidance={ea.SCALARS: 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            for ev in acc.Scalars(tag):
                row = rows.setdefault(ev.step, {"step": ev.step, "time": ev.wall_time})
                row[tag] = ev.value
                row["time"] = min(row["time"], ev.wall_time)
    return [rows[s] for s in sorted(rows)]


def _read_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CONFIG_FILE
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        logger.warning("%s is not valid YAML (%s); the report omits the config", path, err)
        return {}
    return data if isinstance(data, dict) else {}


def _stage(config: dict[str, Any], metrics: dict[str, Series]) -> str:
    if config.get("stage") in ("ppo", "sft", "rm", "dpo", "kto"):
        return config["stage"]
    if any(k.startswith(("ppo/", "env/", "objective/")) for k in metrics):
        return "ppo"
    if "train/accuracy" in metrics or "eval/accuracy" in metrics:
        return "rm"
    return "sft" if "train/loss" in metrics else "unknown"
