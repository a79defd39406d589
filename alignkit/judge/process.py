"""Run ``alignkit judge serve`` as a child process on a free 127.0.0.1 port.

The demo and benchmarks use a separate process rather than a thread so that the judge's
request handling does not compete with training for the trainer's GIL.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JudgeProcess:
    """``with JudgeProcess(rule="count_good", latency_ms=100) as judge: judge.url``."""

    def __init__(self, *args: str, rule: str = "count_good", latency_ms: float = 0.0, log: Path | None = None,
                 port: int | None = None, env: dict[str, str] | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "alignkit.judge.server", "--port", str(self.port), "--rule", rule,
                    "--latency-ms", str(latency_ms), *args]
        self.log = log
        self.env = env or {}  # extra environment for the child only (e.g. ALIGNKIT_JUDGE_TOKEN)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30.0) -> JudgeProcess:
        out = open(self.log, "w") if self.log else subprocess.DEVNULL  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "OMP_NUM_THREADS": "1", **self.env}
        self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        wait_for_http(self.proc, self.url + "/openapi.json", timeout_s, 0.1, f"judge server ({' '.join(self.cmd)})")
        return self

    def stop(self) -> None:
        stop_process(self.proc, 10)

    def stats(self) -> dict:
        return httpx.get(self.url + "/stats", timeout=5.0).json()

    def __enter__(self) -> JudgeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_process(proc: subprocess.Popen | None, grace_s: float) -> None:
    """SIGTERM ``proc`` if it still runs, SIGKILL it after ``grace_s`` seconds."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_for_http(proc: subprocess.Popen, url: str, timeout_s: float, poll_s: float, what: str) -> None:
    """Poll ``url`` until it answers 200. A child that exits first, or no answer within ``timeout_s``
    (the child is then stopped), is one RuntimeError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it answered")
        try:
            if httpx.get(url, timeout=max(1.0, poll_s)).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    stop_process(proc, 10)
    raise RuntimeError(f"{what} did not answer on {url} within {timeout_s:.0f} s")
