"""vLLM OpenAI servers as the rollout engine (``rollout: {engine: vllm_server}``): an HTTP client
that never imports vllm, so a trainer without vLLM drives servers that own their own devices
(tensor and expert parallel inside each server, data parallel across servers).

- **Servers.** ``urls``: servers the user started; else ``num_servers`` started by alignkit
  (``server_process``), health-checked, stopped by ``close``. They serve the policy's *base*: the
  model on disk, or, when SFT adapters were merged into it in memory (``adapter_name_or_path``),
  that merged base written once to ``<work_dir>/base`` (reused on resume).
- **Requests.** The prompts of a ``generate`` call are spread round-robin over the servers and sent
  concurrently, each with its own sampling settings and a seed drawn from torch's RNG, prompt as
  token ids; the tokens and their log-probs (``--logprobs-mode processed_logprobs``: under the
  sampling distribution, as the trainer computes them) come back per request.
- **Weight sync (LoRA).** ``sync_weights`` marks the policy changed; the next ``generate`` saves the
  policy adapter ("default") with PEFT to ``<work_dir>/adapters/<name>``, loads it on every server
  as ``policy-v{N}-<tag>`` (``/v1/load_lora_adapter``) and unloads the previous one. Requests name
  that version. The base is never resent. The push is lazy so that a resumed run's restored
  adapter (loaded after the engine is built) is the one pushed first.
- **Weight sync (full fine-tuning).** ``full_sync``: after each update the policy is gathered one
  bucket of whole layers at a time (ZeRO-3, FSDP2: never the whole model on one rank) and rank 0 has
  every server load each bucket in place (dev-mode ``/collective_rpc`` into alignkit's vLLM worker
  extension); requests keep naming the base. The first push (the run's start or resume) is lazy too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Literal

import httpx
import torch
from pydantic import Field, model_validator
from torch import nn

from alignkit.generation.engine import SamplingParams, engine_sync_check
from alignkit.generation.full_sync import push_full
from alignkit.generation.registry import EngineContext, EngineSettings, register_engine
from alignkit.generation.sampling import (
    OnFinished,
    Rollout,
    prompt_token_lists,
    request_seeds,
    rollout_from_tokens,
)
from alignkit.generation.server_process import (
    FULL_SYNC_EXTENSION,
    ServerProcess,
    full_sync_env,
    log_tail,
    lora_rank_slot,
    vllm_python,
)
from alignkit.generation.weights import POLICY_ADAPTER, SyncCheck, plain_model, policy_lm

logger = logging.getLogger(__name__)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json")


class ServerSettings(EngineSettings):
    engine: Literal["vllm_server"] = "vllm_server"
    urls: list[str] | None = Field(None, description="Servers the user started (http://host:port), serving the "
                                   "policy's base with --enable-lora; none: alignkit starts num_servers.")
    num_servers: int = Field(1, ge=1, description="vLLM servers alignkit starts (data-parallel rollouts).")
    python: str | None = Field(None, description="Interpreter for alignkit-started servers (default: "
                               "$ALIGNKIT_VLLM_PYTHON, else .venv-vllm/bin/python if present, else this one).")
    devices: list[str] | None = Field(None, description="CUDA_VISIBLE_DEVICES of each started server "
                                      "(e.g. ['0,1,2,3', '4,5,6,7']); none: inherited.")
    tensor_parallel_size: int = Field(1, ge=1, description="Devices each started server shards the model over.")
    enable_expert_parallel: bool = Field(False, description="Experts of an MoE model spread over those devices.")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, description="Share of each server device "
                                          "vLLM takes (on CPU the KV cache is VLLM_CPU_KVCACHE_SPACE GiB).")
    max_model_len: int | None = Field(None, ge=8, description="Longest sequence (default: cutoff_len).")
    max_lora_rank: int | None = Field(None, ge=1, description="--max-lora-rank (default: the policy's lora_rank, "
                                      "rounded up to a rank vLLM accepts).")
    max_loras: int = Field(2, ge=1, description="Adapters a server batches at once (the new one loads before the "
                           "old one is unloaded).")
    startup_timeout_s: float = Field(600.0, gt=0.0, description="Longest wait for a started server's /health.")
    request_timeout_s: float = Field(600.0, gt=0.0, description="Longest wait for one completion.")
    work_dir: str | None = Field(None, description="Where the merged base and the adapters are written (must be "
                                 "visible to the servers); default <output_dir>/vllm_server.")
    extra_args: list[str] = Field(default_factory=list, description="More api_server arguments for started servers.")
    sync_bucket_mb: float = Field(256.0, gt=0.0, description="Full fine-tuning: MiB of whole layers gathered and "
                                  "pushed at a time (a layer larger than this goes alone).")

    @model_validator(mode="after")
    def _urls_or_started(self):
        if self.urls is not None and not self.urls:
            raise ValueError("rollout.urls is empty: list the servers, or drop it and set rollout.num_servers")
        if self.devices is not None and len(self.devices) != self.num_servers:
            raise ValueError(f"rollout.devices lists {len(self.devices)} device sets for rollout.num_servers "
                             f"{self.num_servers}")
        return self


class ServerDown(RuntimeError):
    """A server stopped answering: the run stops; resume it from its checkpoint."""


def server_error(url: str, log: Path | None, detail: str) -> ServerDown:
    where = f"; its log ({log}) ends:{log_tail(log)}" if log is not None else ""
    return ServerDown(f"the vLLM server {url} failed ({detail}){where}. The run stops here: restart the server(s) "
                      "and rerun with resume_from_checkpoint=true to continue from the last checkpoint.")


def write_base(lm: nn.Module, src: str | Path, out: Path, adapters: tuple[str, ...]) -> Path:
    """The policy's base as a HF model directory (every weight but LoRA's, SFT adapters already
    merged), with ``src``'s config and tokenizer files; reused when ``out`` holds the same merge."""
    from safetensors.torch import save_file

    # Paths and file times: an adapter retrained into the same directory makes a new base.
    stamp = {"base": str(src), "merged_adapters": [[a, sorted((f.name, f.stat().st_mtime_ns) for f in Path(a).glob(
        "adapter_model.*"))] for a in adapters]}
    marker = out / "alignkit_base.json"
    stamp = json.loads(json.dumps(stamp))  # as read back (tuples become lists)
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return out
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(src).iterdir():  # config, tokenizer, generation config, chat template
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(f, out / f.name)
    model, _ = plain_model(lm)
    state = {}
    for name, p in model.named_parameters():  # a tied lm_head is listed once, as vLLM expects
        if "modules_to_save" in name or "original_module" in name:
            raise NotImplementedError(f"rollout.engine vllm_server with peft modules_to_save ({name})")
        if ".lora_" not in name:
            state[name.replace(".base_layer.", ".")] = p.detach().to("cpu").contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    marker.write_text(json.dumps(stamp))
    return out


def save_adapter(lm: nn.Module, path: Path) -> None:
    """The policy adapter as a PEFT directory, from the parameters themselves rather than
    ``state_dict`` (FSDP2's state-dict hooks would reshard mid-rollout). ``generate`` runs inside the
    rollout's gather (``sharding.rollout_context``), so under ZeRO-3 each LoRA tensor is whole here;
    an FSDP DTensor is gathered with ``full_tensor`` (every rank pushes at the same step)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor

    own = {}
    for name, p in lm.named_parameters():
        if ".lora_" not in name or f".{POLICY_ADAPTER}." not in name:
            continue
        t = p.full_tensor() if isinstance(p, DTensor) else p
        if t.numel() == 0:  # a ZeRO-3 partition outside a gather
            raise RuntimeError(f"the LoRA tensor {name} is a ZeRO-3 partition (not gathered) at the adapter push")
        own[name] = t.detach().to("cpu").clone()
    state = get_peft_model_state_dict(lm, state_dict=own, adapter_name=POLICY_ADAPTER)
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    lm.peft_config[POLICY_ADAPTER].save_pretrained(str(path))


class VLLMServerEngine:
    """Samples from vLLM OpenAI servers at ``urls``; ``processes``: the ones alignkit started (stopped
    by ``close``). ``work_dir`` holds the adapters it pushes (visible to every server)."""

    reports_finished = True  # generate(on_finished=...): each response as its request returns

    def __init__(self, urls: list[str], pad_token_id: int, work_dir: Path, *, sync_tolerance: float = 0.05,
                 processes: list[ServerProcess] | None = None, request_timeout_s: float = 600.0,
                 full_sync_mb: float | None = None):
        self.urls = [u.rstrip("/") for u in urls]
        self.pad_token_id = pad_token_id
        self.work_dir = Path(work_dir)
        self.sync_tolerance = sync_tolerance
        self.processes = processes or []
        self.logs = {p.url: p.log for p in self.processes}
        self.timeout = request_timeout_s
        rank = int(os.environ.get("RANK", "0"))
        self.next_server = rank  # ranks start at different servers
        # Adapter names unique to this engine and rank: several runs or ranks may share the servers.
        self.tag = f"{uuid.uuid4().hex[:6]}-r{rank}"
        self.base_name = self._get(self.urls[0], "/v1/models")["data"][0]["id"]
        self.version = 0
        self.model_name = self.base_name  # what requests ask for: the base until an adapter is pushed
        self.pending: nn.Module | None = None
        self.sent: list[int] = [0] * len(self.urls)  # requests per server (for logs and tests)
        self.last_sync: dict[str, float] = {}
        self.full_sync_mb = full_sync_mb  # None: LoRA (adapters); else full sync in buckets of this many MiB
        if full_sync_mb is not None and rank == 0:
            self._check_full_sync()

    # -- HTTP -------------------------------------------------------------------------------------
    def _fail(self, url: str, detail: str) -> ServerDown:
        return server_error(url, self.logs.get(url), detail)

    def _get(self, url: str, path: str) -> dict:
        try:
            r = httpx.get(url + path, timeout=30)
        except httpx.TransportError as e:
            raise self._fail(url, f"GET {path}: {e!r}") from None
        if r.status_code != 200:
            raise self._fail(url, f"GET {path}: HTTP {r.status_code} {r.text[:300]}")
        return r.json()

    def _post(self, url: str, path: str, body: dict) -> httpx.Response:
        try:
            r = httpx.post(url + path, json=body, timeout=self.timeout)
        except httpx.TransportError as e:
            raise self._fail(url, f"POST {path}: {e!r}") from None
        if r.status_code != 200:
            raise self._fail(url, f"POST {path} {body}: HTTP {r.status_code} {r.text[:300]}")
        return r

    async def _complete(self, client: httpx.AsyncClient, url: str, body: dict) -> tuple[list[int], list[float]]:
        try:
            r = await client.post(url + "/v1/completions", json=body)
        except httpx.TransportError as e:
            raise self._fail(url, f"POST /v1/completions: {e!r}") from None
        if r.status_code != 200:
            raise self._fail(url, f"POST /v1/completions: HTTP {r.status_code} {r.text[:300]}")
        choice = r.json()["choices"][0]
        return choice["token_ids"], choice["logprobs"]["token_logprobs"]

    async def _complete_all(self, bodies: list[dict], servers: list[str], on_finished: OnFinished | None = None
                            ) -> list[tuple[list[int], list[float]]]:
        limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))

        async def one(client: httpx.AsyncClient, row: int) -> tuple[list[int], list[float]]:
            tokens, logprobs = await self._complete(client, servers[row], bodies[row])
            stop = next((i for i, t in enumerate(tokens) if t in bodies[row]["stop_token_ids"]), None)
            if on_finished is not None and stop is not None:  # scored now, while other requests run
                on_finished(row, tokens[: stop + 1])
            return tokens, logprobs

        async with httpx.AsyncClient(timeout=self.timeout, limits=limits) as client:
            return await asyncio.gather(*(one(client, row) for row in range(len(bodies))))

    # -- RolloutEngine ----------------------------------------------------------------------------
    def generate(self, query_ids: torch.Tensor, query_mask: torch.Tensor, sampling: SamplingParams,
                 pixels: dict[str, torch.Tensor] | None = None, on_finished: OnFinished | None = None) -> Rollout:
        """(B, Q) left-padded prompts -> a ``Rollout`` (``sample``'s conventions) with the servers'
        log-probs of the sampled tokens; ``on_finished`` hears of each response as its request returns."""
        if pixels is not None:  # registered without accepts_images: the loop refuses image prompts first
            raise ValueError("the vllm_server rollout engine takes text prompts only; set rollout.engine: hf")
        if self.pending is not None:
            self.push_adapter(self.pending)
        prompts = prompt_token_lists(query_ids, query_mask)
        bodies = [{
            "model": self.model_name, "prompt": ids, "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature, "top_k": sampling.top_k if sampling.top_k > 0 else -1,
            "top_p": sampling.top_p, "seed": seed,
            # Exactly these stop tokens (the template's end-of-turn included), as the hf engine.
            "stop_token_ids": list(sampling.eos_ids), "ignore_eos": True,
            "logprobs": 0, "return_token_ids": True, "skip_special_tokens": False,
        } for ids, seed in zip(prompts, request_seeds(len(prompts)), strict=True)]
        picks = [(self.next_server + i) % len(self.urls) for i in range(len(bodies))]
        self.next_server = (self.next_server + len(bodies)) % len(self.urls)
        for k in picks:
            self.sent[k] += 1
        out = asyncio.run(self._complete_all(bodies, [self.urls[k] for k in picks], on_finished))
        return rollout_from_tokens(query_ids, query_mask, [t for t, _ in out], [lp for _, lp in out],
                                   list(sampling.eos_ids), self.pad_token_id)

    def sync_weights(self, policy: nn.Module) -> None:
        """The next ``generate`` samples from ``policy``'s current weights: LoRA, its adapter pushed
        then (see the module doc); full fine-tuning after the first push, pushed now, bucket by bucket,
        outside the rollout's gather (every rank calls this after the update)."""
        if self.full_sync_mb is not None and self.version > 0:
            self.push_full(policy)
        else:
            self.pending = policy

    def push_full(self, policy: nn.Module) -> None:
        """Every server's weights replaced by ``policy``'s (``full_sync.push_full``); requests keep the base's name."""
        def load(path: Path) -> None:
            for url in self.urls:
                self._post(url, "/collective_rpc", {"method": "alignkit_load_weights_file", "args": [str(path)]})

        def reset() -> None:
            for url in self.urls:
                self._post(url, "/reset_prefix_cache", {})

        stats = push_full(policy_lm(policy), self.full_sync_mb, load, self.work_dir, reset)
        self.version, self.pending = self.version + 1, None
        self.last_sync = {"seconds": stats.seconds, "version": float(self.version), "bytes": float(stats.total_bytes),
                          "buckets": float(stats.buckets), "max_bucket_bytes": float(stats.max_held)}

    def _check_full_sync(self) -> None:
        for url in self.urls:
            try:
                r = httpx.post(url + "/collective_rpc", json={"method": "alignkit_packed_modules"}, timeout=60)
            except httpx.TransportError as e:
                raise self._fail(url, f"POST /collective_rpc: {e!r}") from None
            if r.status_code != 200:
                raise ValueError(
                    f"the vLLM server {url} cannot take full-fine-tuning weight syncs (POST /collective_rpc: HTTP "
                    f"{r.status_code} {r.text[:200]}): start it with VLLM_SERVER_DEV_MODE=1, PYTHONPATH naming "
                    f"alignkit's source and --worker-extension-cls {FULL_SYNC_EXTENSION} (docs/vllm.md), or "
                    "use finetuning_type: lora")

    def push_adapter(self, policy: nn.Module) -> None:
        """Save the policy adapter, load it on every server under a new version name, unload the
        previous one (``generate`` calls it when a sync is pending; full fine-tuning: ``push_full``)."""
        if self.full_sync_mb is not None:
            return self.push_full(policy)
        t0 = time.perf_counter()
        lm = policy_lm(policy)
        name = f"policy-v{self.version + 1}-{self.tag}"
        path = self.work_dir / "adapters" / name
        save_adapter(lm, path)
        for url in self.urls:
            self._post(url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path.absolute())})
        previous = self.model_name
        self.model_name, self.version, self.pending = name, self.version + 1, None
        if previous != self.base_name:
            self._unload(previous)
        self.last_sync = {"seconds": time.perf_counter() - t0, "version": float(self.version),
                          "bytes": float(sum(f.stat().st_size for f in path.iterdir() if f.is_file()))}

    def _unload(self, name: str) -> None:
        for url in self.urls:
            self._post(url, "/v1/unload_lora_adapter", {"lora_name": name})
        shutil.rmtree(self.work_dir / "adapters" / name, ignore_errors=True)

    def check_sync(self, rollouts: list[Rollout], trainer_logprobs: list[torch.Tensor], sampling: SamplingParams
                   ) -> SyncCheck | None:
        return engine_sync_check(self.sync_tolerance, rollouts, trainer_logprobs, sampling)

    def close(self) -> None:
        """Unload this engine's adapter from the servers (best effort) and stop the servers it started."""
        if self.model_name != self.base_name and all(p.alive() for p in self.processes):
            try:
                self._unload(self.model_name)
            except ServerDown as e:
                logger.warning("could not unload %s: %s", self.model_name, e)
        for p in self.processes:
            p.stop()
        self.processes = []


def server_args(settings: ServerSettings, policy: nn.Module, ctx: EngineContext) -> list[str]:
    """api_server arguments of an alignkit-started server, from the ``rollout:`` settings."""
    peft_cfg = getattr(policy_lm(policy), "peft_config", {}).get(POLICY_ADAPTER)
    rank = settings.max_lora_rank or lora_rank_slot(peft_cfg.r if peft_cfg is not None else 8)
    args = ["--dtype", ctx.dtype, "--max-model-len", str(settings.max_model_len or ctx.max_model_len),
            "--seed", str(ctx.seed), "--enable-lora", "--max-lora-rank", str(rank),
            "--max-loras", str(settings.max_loras), "--tensor-parallel-size", str(settings.tensor_parallel_size),
            "--gpu-memory-utilization", str(settings.gpu_memory_utilization),
            # Log-probs under the distribution sampled from (temperature, top-k/top-p), as the
            # trainer computes them; vLLM's default is the raw model's.
            "--logprobs-mode", "processed_logprobs", "--served-model-name", "base"]
    if settings.enable_expert_parallel:
        args.append("--enable-expert-parallel")
    if peft_cfg is None:  # full fine-tuning: weights are pushed through alignkit's worker extension
        args += ["--worker-extension-cls", FULL_SYNC_EXTENSION]
    if not torch.cuda.is_available():  # torch.compile on CPU recompiles at every start (minutes)
        args.append("--enforce-eager")
    return args + list(settings.extra_args)


def start_servers(settings: ServerSettings, policy: nn.Module, ctx: EngineContext, work_dir: Path
                  ) -> list[ServerProcess]:
    """``num_servers`` servers on the policy's base, all healthy (or all stopped and one error)."""
    lm = policy_lm(policy)
    base = write_base(lm, ctx.model_name_or_path, work_dir / "base", ctx.adapters) if ctx.adapters \
        else Path(ctx.model_name_or_path)
    python, args = vllm_python(settings.python), server_args(settings, policy, ctx)
    env = full_sync_env() if FULL_SYNC_EXTENSION in args else None
    procs = [ServerProcess(python, base, args, work_dir / f"server-{i}.log",
                           settings.devices[i] if settings.devices else None, env=env)
             for i in range(settings.num_servers)]
    try:
        for p in procs:
            p.wait_healthy(settings.startup_timeout_s)
    except BaseException:
        for p in procs:
            p.stop()
        raise
    return procs


def build_server_engine(settings: ServerSettings, policy: nn.Module, ctx: EngineContext) -> VLLMServerEngine:
    from peft import PeftModel

    full = not isinstance(policy_lm(policy), PeftModel)
    if settings.urls is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("rollout.num_servers starts servers from one process only; with several training ranks "
                         "start the servers yourself and list them in rollout.urls (docs/distributed.md)")
    work_dir = Path(settings.work_dir) if settings.work_dir else (
        Path(ctx.output_dir) / "vllm_server" if ctx.output_dir else Path(tempfile.mkdtemp(prefix="alignkit-vllm-")))
    procs = [] if settings.urls is not None else start_servers(settings, policy, ctx, work_dir)
    try:
        engine = VLLMServerEngine(settings.urls or [p.url for p in procs], ctx.pad_token_id, work_dir,
                                  sync_tolerance=settings.sync_tolerance, processes=procs,
                                  request_timeout_s=settings.request_timeout_s,
                                  full_sync_mb=settings.sync_bucket_mb if full else None)
    except BaseException:
        for p in procs:
            p.stop()
        raise
    engine.sync_weights(policy)
    return engine


# Registered here (alignkit.generation imports this module): the registry cannot import its engines'
# settings without an import cycle. Not needs_whole_weights: only the LoRA adapter is sent, saved
# inside the rollout's gather (ZeRO-3, FSDP).
register_engine("vllm_server", ServerSettings, build_server_engine)
