"""Metrics to JSONL (always), TensorBoard (``report_to: tensorboard``) and PNG plots."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


class MetricLogger:
    """Writes one JSON line per logged step and the same scalars to TensorBoard.

    Only the main process writes; other ranks get a logger whose calls do nothing.
    """

    def __init__(self, output_dir: str | Path, report_to: list[str], enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.dir = Path(output_dir)
        self.writer = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / METRICS_FILE
        if path.exists():
            # On resume, drop lines logged after the checkpoint so the log reads as one run.
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in kept))
        self.file = path.open("a")
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.dir / "runs"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self.file.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.writer is not None:
            self.writer.close()


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
