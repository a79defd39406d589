"""Full-fine-tuning weight sync into vLLM servers, from a sharded trainer one bucket at a time.

The trainer never holds the whole model for a sync: the policy's parameters are walked in buckets
of whole vLLM layers (one decoder layer, or one other module, merged up to ``bucket_mb``). For each
bucket every rank takes part in gathering it (ZeRO-3: ``deepspeed.zero.GatheredParameters`` over the
bucket's parameters; FSDP2: ``DTensor.full_tensor`` per parameter; unsharded: the parameter itself),
rank 0 writes it as one safetensors file under ``work_dir`` and asks every server to load it:
``POST /collective_rpc {"method": "alignkit_load_weights_file", "args": [path]}`` (vLLM's dev-mode
endpoint, ``VLLM_SERVER_DEV_MODE=1``) runs ``WeightSyncExtension.alignkit_load_weights_file`` in every
worker of the server (``--worker-extension-cls``; each tensor-parallel worker takes its own slice), which
reloads those layers in place with vLLM's own ``reload_weights`` (the CPU backend repacks them). Then the
bucket is freed (ZeRO-3 re-partitions it) before the next is gathered. A bucket holds whole layers
because vLLM fuses q/k/v and gate/up into one layer: a layer reloaded from part of its weights would
keep garbage in the rest. After the last bucket each server's prefix cache is reset (cached prefixes
hold the old weights' keys and values) and the ranks meet at a barrier, so none samples before the
servers hold the new weights.

Cost per sync: the whole model's bytes (in the trainer's dtype) written once to ``work_dir`` and read
by every server worker, one all-gather per bucket (ZeRO-3) or per parameter (FSDP2), one HTTP call per
bucket and server. Peak per rank: one bucket. ``bench/rollout_engines.py`` measures it.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from alignkit.generation.weights import plain_model

LAYER = re.compile(r"^(.*\.layers\.\d+)\.")  # a decoder layer (model.layers.N.): one vLLM unit


@dataclass
class FullSyncStats:
    """What one sync moved: ``max_held`` is the most parameter bytes a rank held gathered at once."""

    total_bytes: int = 0
    max_held: int = 0
    buckets: int = 0
    seconds: float = 0.0
    held: list[int] = field(default_factory=list)  # bytes of each bucket, in order


def numel(p: nn.Parameter) -> int:
    """A parameter's whole size, a ZeRO-3 partition's (``ds_numel``) and an FSDP2 shard's included."""
    return int(getattr(p, "ds_numel", p.numel()))


def weight_groups(lm: nn.Module) -> list[list[tuple[str, nn.Parameter]]]:
    """The plain model's parameters (Hugging Face names; a tied ``lm_head`` once, as vLLM expects),
    grouped by vLLM unit: one group per decoder layer, one per other module, in model order."""
    model, is_lora = plain_model(lm)
    if is_lora:
        raise ValueError("full_sync pushes the whole model of a full fine-tuning run; LoRA runs push adapters")
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        layer = LAYER.match(name)
        groups.setdefault(layer.group(1) if layer else name.rpartition(".")[0], []).append((name, p))
    return list(groups.values())


def buckets(lm: nn.Module, bucket_mb: float) -> list[list[tuple[str, nn.Parameter]]]:
    """``weight_groups`` merged in order while a bucket stays within ``bucket_mb`` MiB (a group larger
    than that is a bucket of its own: a layer is never split)."""
    limit, out, size = bucket_mb * 2**20, [], 0
    for group in weight_groups(lm):
        nbytes = sum(numel(p) * p.element_size() for _, p in group)
        if out and size + nbytes <= limit:
            out[-1].extend(group)
            size += nbytes
        else:
            out.append(list(group))
            size = nbytes
    return out


@contextmanager
def gathered_bucket(bucket: list[tuple[str, nn.Parameter]]) -> Iterator[dict[str, torch.Tensor]]:
    """The bucket's tensors whole, as contiguous CPU copies (a collective: every rank enters it).
    ZeRO-3 partitions are gathered for the block and re-partitioned after; parameters already whole
    (inside the rollout's gather) are read as they are."""
    from torch.distributed.tensor import DTensor

    partitioned = [p for _, p in bucket if getattr(p, "ds_status", None) is not None
                   and p.ds_status.name == "NOT_AVAILABLE"]
    if partitioned:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
    else:
        ctx = _nothing()
    with ctx:
        out = {}
        for name, p in bucket:
            t = p.full_tensor() if isinstance(p, DTensor) else p
            out[name] = t.detach().to("cpu").contiguous()
        yield out


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def push_full(lm: nn.Module, bucket_mb: float, load: Callable[[Path], None], work_dir: Path,
              reset: Callable[[], None]) -> FullSyncStats:
    """Gather ``lm`` bucket by bucket; on rank 0 write each as ``work_dir/full/bucket-K.safetensors``
    and ``load`` it (every server loads the file), then delete it; ``reset`` the servers' caches at the
    end. Every rank calls this at the same point (the gathers are collectives) and leaves it together."""
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    stats, folder = FullSyncStats(), work_dir / "full"
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
    for k, bucket in enumerate(buckets(lm, bucket_mb)):
        with gathered_bucket(bucket) as tensors:
            nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
            stats.held.append(nbytes)
            if rank == 0:
                path = folder / f"bucket-{k}.safetensors"
                save_file(tensors, str(path), metadata={"format": "pt"})
                tensors.clear()  # the copies freed before the servers read the file
                load(path.absolute())
                os.remove(path)
    if rank == 0:
        reset()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank samples before every server holds the new weights
    stats.total_bytes, stats.max_held, stats.buckets = sum(stats.held), max(stats.held), len(stats.held)
    stats.seconds = time.perf_counter() - t0
    return stats
