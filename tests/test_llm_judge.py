"""A real LLM judge: vLLM's OpenAI server (``.venv-vllm``) on SmolLM2-135M-Instruct scores a short GRPO run.

Run by .venv's Python like every other test; ``alignkit judge serve --llm FILE.gguf`` runs as a child
process and starts the server in .venv-vllm; the test reads the block it prints. A recording proxy (a real HTTP server on 127.0.0.1)
sits between the trainer's client and vLLM, so the test knows every reply the judge gave and can
check the trainer's accounting against them: a reply without a score is a failure, counted and
kept out of the reward mean, never a 0. A 135M judge is weak (it often answers the question instead
of scoring it), which is exactly the failure mode this exercises. The server takes ~1 min to start.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml

from alignkit.config import load_config
from alignkit.judge.llm import LLM_SCORE_REGEX
from alignkit.judge.process import free_port
from alignkit.models.gguf import convert_gguf
from alignkit.train import ppo
from alignkit.train.tracking import read_metrics
from tests.real_judge import smollm2_judge

GGUF, MISSING = smollm2_judge()
ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING is not None, reason=str(MISSING))]

# Arithmetic prompts draw replies with numbers from this judge; the others mostly draw none.
PROMPTS = ["What is 2 + 3?", "Name a colour.", "What is 4 + 4?", "Name a fruit."]
STEPS, PROMPTS_PER_STEP, GROUP = 2, 2, 2


class Recorder:
    """A forwarding proxy that keeps the text of every judge reply, in order."""

    def __init__(self, upstream: str):
        self.replies: list[str] = []
        client = httpx.Client(timeout=120)
        replies, lock = self.replies, threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                up = client.post(upstream, content=body, headers={"Content-Type": "application/json"})
                with lock:
                    replies.append(up.json()["choices"][0]["message"]["content"])
                self.send_response(up.status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(up.content)))
                self.end_headers()
                self.wfile.write(up.content)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/chat/completions"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def printed_block(proc: subprocess.Popen, timeout_s: float = 600) -> str:
    """The reward_api block ``alignkit judge serve --llm`` prints once its server answers."""
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        text = "".join(lines)
        if "reward_api:" in text and "  timeout_s:" in text.split("reward_api:", 1)[1]:
            return "reward_api:" + text.split("reward_api:", 1)[1]
        time.sleep(1)
    raise RuntimeError(f"judge serve --llm printed no reward_api block: {''.join(lines)[-2000:]}")


@pytest.fixture(scope="module")
def judge():
    """``alignkit judge serve --llm`` on the .gguf file itself, as a user runs it; its printed block."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "alignkit.cli", "judge", "serve", "--llm", str(GGUF), "--port", str(free_port()),
         "--served-name", "smollm2-judge"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        block = yaml.safe_load(printed_block(proc))["reward_api"]
        recorder = Recorder(block["url"])
        yield block, recorder
        recorder.close()
    finally:
        proc.terminate()  # the command stops its vLLM child on SIGTERM
        proc.wait(60)


def parse(reply: str) -> float | None:
    """What the openai_judge preset reads from a reply with the printed block: the last 0-10 number, or None."""
    found = re.findall(LLM_SCORE_REGEX, reply)
    return float(found[-1]) / 10 if found else None


def test_grpo_scored_by_a_real_llm_judge_counts_failures_and_logs_latency(judge, tmp_path):
    block, recorder = judge
    assert block["preset"] == "openai_judge" and block["model"] == "smollm2-judge"
    data = tmp_path / "data"
    data.mkdir()
    (data / "q.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    (data / "dataset_info.json").write_text(json.dumps({"q": {"file_name": "q.jsonl", "columns": {"prompt": "prompt"}}}))
    # The block `alignkit judge serve --llm` prints, pointed at the recording proxy.
    config = tmp_path / "grpo.yaml"
    config.write_text(yaml.safe_dump({"reward_api": {**block, "url": recorder.url}}))
    overrides = [f"model_name_or_path={convert_gguf(GGUF)}", "stage=ppo", "dataset=q", f"dataset_dir={data}",
                 "template=auto", "finetuning_type=lora", "lora_rank=8", "lora_target=q_proj,v_proj",
                 f"output_dir={tmp_path / 'run'}", "report_to=none", "plot_loss=false", "advantage_estimator=grpo",
                 f"num_generations={GROUP}", f"per_device_train_batch_size={PROMPTS_PER_STEP}", "ppo_buffer_size=1",
                 "ppo_epochs=1", "max_new_tokens=12", "learning_rate=1e-4", "beta=0", f"max_steps={STEPS}",
                 "save_steps=1000", "reward_model_type=api", "max_failure_rate=1.0", "seed=0",
                 "reward_api.health_check=false",  # its probe item is not a question this judge scores
                 "judge_canaries=false"]  # the replies below are the steps' own, in order
    run = ppo.run(load_config(config, overrides))

    metrics = [m for m in read_metrics(run) if "env/reward_mean" in m]
    assert len(metrics) == STEPS
    per_step = PROMPTS_PER_STEP * GROUP
    assert len(recorder.replies) == STEPS * per_step  # one request per sample, no retries of a "no score"
    for step, m in enumerate(metrics):
        scores = [parse(r) for r in recorder.replies[step * per_step : (step + 1) * per_step]]
        valid = [s for s in scores if s is not None]
        assert m["reward/failures"] == len(scores) - len(valid)
        if valid:  # the mean is over scored samples only: a failure would pull a zero-filled mean down
            assert m["env/reward_mean"] == pytest.approx(sum(valid) / len(valid), abs=1e-5)
        assert 0 < m["reward/latency_p50"] <= m["reward/latency_p95"]
        print(f"step {step + 1}: {len(valid)}/{len(scores)} scored, failures {m['reward/failures']:.0f}, reward "
              f"{m['env/reward_mean']:.3f}, latency p50 {m['reward/latency_p50']:.2f} s p95 {m['reward/latency_p95']:.2f} s")
    every = [parse(r) for r in recorder.replies]
    assert any(s is None for s in every) and any(s is not None for s in every), recorder.replies
