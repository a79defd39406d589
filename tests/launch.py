"""Launching ``alignkit`` on two CPU processes (gloo) for the multi-process tests."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, ROOT

WORLD = 2
TAIL = int(os.environ.get("LAUNCH_STDERR_TAIL", "6000"))  # stderr characters a failed launch reports
requires_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed is not installed: run scripts/setup_deepspeed.sh (deepspeed==0.19.8 into .venv)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: Path, overrides: list[str], env: dict[str, str] | None = None, timeout: float = 240,
           accelerate: str | None = None, module: str = "alignkit.cli") -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m alignkit.cli train CONFIG ...`` on CPU, one thread per rank;
    ``accelerate="ddp"`` (or ``deepspeed_zero3`` ...): ``accelerate launch`` with that shipped config
    from examples/accelerate instead. ``module`` replaces ``alignkit.cli`` (a test's own script)."""
    if accelerate:
        # On a machine without GPUs, alignkit's setup_run turns the MULTI_GPU config into DDP over gloo
        # and gives DeepSpeed gloo; the shipped configs' bf16 is for GPUs.
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(EXAMPLES / "accelerate" / f"{accelerate}.yaml"), "--num_processes", str(WORLD),
                    "--mixed_precision", "no", "--main_process_ip", "127.0.0.1", "--main_process_port",
                    str(free_port())]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
                    "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    args = ["train", str(config), *overrides] if module == "alignkit.cli" else [str(config), *overrides]
    cmd = [*launcher, "-m", module, *args]
    # Tiny models on a shared 2-core runner: more than one intra-op thread per rank is 10x slower.
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-TAIL:]}"
    return proc


def launch_nodes(config: Path, overrides: list[str], nodes: int = 2, timeout: float = 300) -> list[str]:
    """``torchrun --nnodes N --node_rank i --nproc_per_node 1`` once per "node", all on 127.0.0.1 (one
    rendezvous at ``--master_addr 127.0.0.1 --master_port P``), each ``-m alignkit.cli train CONFIG ...``,
    as on N machines; returns each launcher's output (stdout and stderr together)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--node_rank", str(i),
         "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
         "-m", "alignkit.cli", "train", str(config), *overrides],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(nodes)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:  # one launcher failed or timed out: do not leave the other waiting at the rendezvous
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"node {i} exit {p.returncode}\n{out[-TAIL:]}"
    return outputs
