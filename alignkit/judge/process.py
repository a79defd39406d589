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
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"judge server exited with code {self.proc.returncode}: {' '.join(self.cmd)}")
            try:
                if httpx.get(self.url + "/openapi.json", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"judge server did not answer on {self.url} within {timeout_s} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def stats(self) -> dict:
        return httpx.get(self.url + "/stats", timeout=5.0).json()

    def __enter__(self) -> JudgeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
