"""vLLM as the rollout engine, colocated with the trainer, its weights pushed after every update.

The engine only samples: the trainer's own forward pass gives every log-prob a loss uses. What
vLLM reports for the sampled tokens comes back as ``Rollout.logprobs`` for the sync check.

Weight sync (``sync_weights``): the policy as one plain model (LoRA adapter "default" merged as
``W + B @ A * scale`` on copies; the trainer's modules are never touched) goes to vLLM's workers as
safetensors bytes through ``collective_rpc`` -- tensors passed directly kill the engine -- and
``reload_weights`` loads them in place, re-running the per-layer post-processing (the CPU backend
repacks every linear weight for oneDNN, so writing into the parameters is not enough). A model's
first sync sends everything; later ones only the modules the optimizer can change, widened to whole
vLLM layers (``q_proj`` goes with ``k_proj`` and ``v_proj`` into one fused ``qkv_proj``): a layer
reloaded from part of its weights would keep garbage in the rest. Then the prefix cache is reset,
or cached prompt prefixes keep the old weights' keys and values.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alignkit.generation.engine import SamplingParams, engine_sync_check
from alignkit.generation.sampling import (
    OnFinished,
    Rollout,
    prompt_token_lists,
    request_seeds,
    rollout_from_tokens,
)
from alignkit.generation.weights import (
    SyncCheck,
    merged_weights,
    policy_lm,
    trainable_modules,
    widen_to_fused,
)

logger = logging.getLogger(__name__)

INSTALL_HINT = ("install vLLM: on a GPU `pip install 'alignkit[vllm]'` next to your CUDA torch; on CPU "
                "`./scripts/setup_vllm.sh` and run with .venv-vllm/bin/python (docs/vllm.md)")
# The CPU backend sizes its KV cache from this (GiB) instead of gpu_memory_utilization; vLLM's
# default takes a large share of the machine's memory, which the trainer needs.
CPU_KVCACHE_GB = "1"


def import_vllm():
    """``import vllm`` with an error that says how to install it."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"rollout_engine: vllm needs the vllm package ({e}); {INSTALL_HINT}") from e
    return vllm


class WeightSyncExtension:
    """Mixed into each vLLM worker (``LLM(worker_extension_cls=...)``); called by ``collective_rpc``."""

    def alignkit_load_weights(self, data: bytes) -> int:
        """Load HF-named weights (safetensors bytes) in place; returns how many tensors."""
        from safetensors.torch import load

        state = load(data)
        _reload_keeping_ties(self.model_runner, state)
        return len(state)

    def alignkit_load_weights_file(self, path: str) -> int:
        """``alignkit_load_weights`` from a safetensors file (a vLLM server's ``/collective_rpc`` passes
        strings only: alignkit.generation.full_sync); returns how many tensors."""
        from safetensors.torch import load_file

        state = load_file(path)
        _reload_keeping_ties(self.model_runner, state)
        return len(state)

    def alignkit_packed_modules(self) -> dict[str, list[str]]:
        """vLLM's fused layers and the HF modules in each (``qkv_proj: [q_proj, k_proj, v_proj]``)."""
        return {k: list(v) for k, v in getattr(self.model_runner.get_model(), "packed_modules_mapping", {}).items()}


def _reload_keeping_ties(runner, state: dict[str, torch.Tensor]) -> None:
    """``reload_weights``, then the per-layer post-processing re-run for every layer tied to a reloaded
    one. A tied ``lm_head`` (``tie_word_embeddings``) shares the embedding's tensor, which the reload
    updates, but the CPU backend keeps its own repacked copy for the logits GEMM, made when the head
    was processed: the reload of ``embed_tokens`` alone leaves the head sampling from the old weights
    (measured: 0.34 nats/token off after the embedding changed)."""
    model = runner.get_model()
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((f"{name}.{pname}", module))
    tied = [group for group in owners.values() if len(group) > 1]
    with _quiet_partial_reload():
        runner.reload_weights(weights_iterator=iter(state.items()))
    for group in tied:
        if any(name in state for name, _ in group):
            for name, module in group:
                method = getattr(module, "quant_method", None)
                if name not in state and method is not None and hasattr(method, "process_weights_after_loading"):
                    method.process_weights_after_loading(module)


@contextmanager
def _quiet_partial_reload():
    """A partial reload logs "Failed to load weights" for every layer it was not sent (vLLM then
    keeps that layer's current tensors, which is what a partial sync wants)."""
    names = ["vllm.model_executor.model_loader.reload.layerwise", "vllm.model_executor.model_loader.reload.inplace"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class VLLMEngine:
    """Samples with a vLLM ``LLM`` in this node, sharing its devices with the trainer.

    ``model``: a HF model directory with the policy's architecture and tokenizer (the base); its
    weights are replaced by the policy's at the first ``sync_weights``. Until then vLLM samples
    from the weights in ``model``, so call ``sync_weights(policy)`` once before the first
    ``generate`` whenever they differ (SFT adapters merged into the base, a resumed run).
    The ``rollout:`` settings (``VLLMSettings``) map to ``vllm.LLM``'s arguments of the same names; ``llm_kwargs`` go
    to it as they are. ``gpu_memory_utilization`` is the share of the GPU vLLM takes (weights and
    KV cache) next to the trainer; on CPU the KV cache is ``VLLM_CPU_KVCACHE_SPACE`` GiB instead.
    """

    reports_finished = True  # generate(on_finished=...): each response as vLLM finishes it

    def __init__(self, model: str | Path, pad_token_id: int, *, dtype: str = "auto", max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.3, tensor_parallel_size: int = 1,
                 enable_sleep_mode: bool = False, enforce_eager: bool | None = None, seed: int = 0,
                 sync_tolerance: float = 0.05, **llm_kwargs: Any):
        vllm = import_vllm()
        on_cpu = not torch.cuda.is_available()
        if on_cpu:
            if enable_sleep_mode:
                raise ValueError("rollout.enable_sleep_mode: vLLM's sleep mode needs a GPU; set it to false on CPU")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GB)
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")
        self._vllm = vllm
        self.pad_token_id = pad_token_id
        self.sync_tolerance = sync_tolerance
        self.sleep_mode = enable_sleep_mode
        self.llm = vllm.LLM(
            model=str(model), dtype=dtype, max_model_len=max_model_len, seed=seed,
            gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
            enable_sleep_mode=enable_sleep_mode,
            # torch.compile on CPU recompiles at every start (minutes); CUDA graphs pay off on GPUs.
            enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
            # Log-probs under the distribution sampled from (temperature, top-k/top-p), as the
            # trainer computes them with the same temperature; vLLM's default is the raw model's.
            logprobs_mode="processed_logprobs",
            worker_extension_cls=f"{__name__}.WeightSyncExtension",
            **llm_kwargs,
        )
        self.packed = self.llm.collective_rpc("alignkit_packed_modules")[0]
        self.synced_lm: weakref.ref | None = None  # the model the engine's weights came from
        self.warned = False
        self.asleep = False
        self.last_sync: dict[str, float] = {}  # seconds, bytes, tensors of the latest sync (for logs)

    def generate(self, query_ids: torch.Tensor, query_mask: torch.Tensor, sampling: SamplingParams,
                 pixels: dict[str, torch.Tensor] | None = None, on_finished: OnFinished | None = None) -> Rollout:
        """(B, Q) left-padded prompts -> a ``Rollout`` with ``sample``'s conventions: response
        right-padded to the longest, tokens after the first EOS replaced by pad, mask up to and
        including the first EOS; plus the engine's log-probs of the sampled tokens. ``on_finished``
        hears of each response that stops as soon as vLLM finishes it."""
        if pixels is not None:  # registered without accepts_images: the loop refuses image prompts first
            raise ValueError("the vllm rollout engine takes text prompts only; set rollout.engine: hf for image prompts")
        if self.synced_lm is None and not self.warned:
            logger.warning("vLLM samples from the weights it loaded from disk: sync_weights(policy) was never called")
            self.warned = True
        self._wake()
        prompts = [{"prompt_token_ids": ids} for ids in prompt_token_lists(query_ids, query_mask)]
        params = [self._vllm.SamplingParams(
            max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
            top_k=sampling.top_k if sampling.top_k > 0 else -1, top_p=sampling.top_p,
            # Exactly these stop tokens (the template's end-of-turn included), as the hf engine.
            stop_token_ids=list(sampling.eos_ids), ignore_eos=True,
            logprobs=0, detokenize=False, seed=seed) for seed in request_seeds(len(prompts))]
        if on_finished is None:
            samples = [o.outputs[0] for o in self.llm.generate(prompts, params, use_tqdm=False)]
        else:
            samples = self._step_through(prompts, params, set(sampling.eos_ids), on_finished)
        self._sleep()
        return rollout_from_tokens(
            query_ids, query_mask, [list(s.token_ids) for s in samples],
            [[lp[t].logprob for t, lp in zip(s.token_ids, s.logprobs, strict=True)] for s in samples],
            list(sampling.eos_ids), self.pad_token_id)

    def _step_through(self, prompts: list[dict], params: list, eos: set[int], on_finished: OnFinished) -> list:
        """``LLM.generate`` run step by step through vLLM's public engine loop (``enqueue``, then
        ``llm_engine.step``), so that each response that samples a stop token goes to
        ``on_finished`` (its tokens through the stop) as soon as it finishes; the rows' outputs."""
        row_of = {}
        for row, rid in enumerate(self.llm.enqueue(prompts, params, use_tqdm=False)):
            # enqueue returns vLLM's internal ids ("<id>-<8 random chars>"); outputs carry "<id>"
            row_of[rid] = row_of[rid.rsplit("-", 1)[0]] = row
        done: dict[int, object] = {}
        engine = self.llm.llm_engine
        while engine.has_unfinished_requests():
            for out in engine.step():
                if not out.finished:
                    continue
                row, sample = row_of[out.request_id], out.outputs[0]
                done[row] = sample
                tokens = list(sample.token_ids)
                stop = next((i for i, t in enumerate(tokens) if t in eos), None)
                if stop is not None:  # scored now, while the rest still decode
                    on_finished(row, tokens[: stop + 1])
        return [done[row] for row in range(len(prompts))]

    def sync_weights(self, policy: nn.Module) -> None:
        """Push ``policy``'s current weights (an ``ActorCritic`` or a causal LM) into vLLM."""
        from safetensors.torch import save

        t0 = time.perf_counter()
        lm = policy_lm(policy)
        # A model's first sync sends everything (its frozen weights may differ from what vLLM holds).
        same = self.synced_lm is not None and self.synced_lm() is lm
        modules = widen_to_fused(trainable_modules(lm), self.packed) if same else None
        data = save(merged_weights(lm, modules))
        self._wake()  # level-1 sleep keeps the weights in host memory: bring them back first
        n = self.llm.collective_rpc("alignkit_load_weights", args=(data,))[0]
        self.llm.reset_prefix_cache()
        self.synced_lm = weakref.ref(lm)
        self.last_sync = {"seconds": time.perf_counter() - t0, "bytes": float(len(data)), "tensors": float(n)}

    def check_sync(self, rollouts: list[Rollout], trainer_logprobs: list[torch.Tensor], sampling: SamplingParams
                   ) -> SyncCheck | None:
        return engine_sync_check(self.sync_tolerance, rollouts, trainer_logprobs, sampling)

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def _sleep(self) -> None:
        # Level 1: weights to host memory, KV cache dropped, so the update has the device to itself.
        if self.sleep_mode:
            self.llm.sleep(level=1)
            self.asleep = True

    def close(self) -> None:
        """Stop vLLM's engine processes and free their memory."""
        self.llm.llm_engine.engine_core.shutdown()
