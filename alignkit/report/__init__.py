"""``alignkit report RUN_DIR``: curves, health checks, timings and the config of a run in one HTML file.

``data`` reads the run (metrics.jsonl or TensorBoard events, config), ``health`` holds the checks,
``render`` draws the PNGs and writes ``report.html``. Matplotlib and TensorBoard load only when a
report is written, so importing this module (as the CLI does at start-up) stays cheap.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` (self-contained), ``run_dir/report/*.png`` and
    ``run_dir/report/health.json``; return the HTML path. Raises FileNotFoundError if the
    directory holds neither metrics.jsonl nor TensorBoard event files."""
    from alignkit.report.render import write_report as _write

    return _write(run_dir)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "report", help="write RUN_DIR/report.html: curves, health checks, timings, config",
        description="Summarise a finished (or running) alignkit run: curves with what healthy looks like, "
                    "ok/warn/fail health checks with the numbers behind them, timings and the resolved config.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run's output_dir (holds metrics.jsonl or runs/ events)")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when any check fails (for CI)")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from alignkit.report.health import FAIL, worst
    from alignkit.report.render import render, report_health, summary_lines

    run, checks = report_health(args.run_dir)
    path = render(run, checks)
    print(f"{run.stage} run, {worst(checks)}:")
    print("\n".join(summary_lines(checks)))
    print(f"report written to {path}")
    return 1 if args.strict and any(c.verdict == FAIL for c in checks) else 0
