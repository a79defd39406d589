"""What changes when the model is sharded (DeepSpeed ZeRO-2/3, FSDP2): in one place, so that the
SFT/RM loop and the PPO loop read the same under DDP, ZeRO and FSDP.

- ``check_supported``: the combinations alignkit runs, or one paragraph saying what to do instead.
- ``configure``: the DeepSpeed config takes its batch sizes and clipping from the alignkit config.
- ``shard`` / ``prepare``: FSDP2 applied by alignkit itself (below), or ``accelerator.prepare``.
- ``backward``: accumulation with DeepSpeed's engine (it owns the reduce and the optimizer step).
- ``full_weights`` / ``rollout_context``: full parameters for a save (rank 0) or for one whole
  rollout (ZeRO-3 and FSDP otherwise gather each layer again for every generated token).
- ``backend``: how the run is spread (``single``, ``ddp``, ``zero2``/``zero3``, ``fsdp``).
- ``full_state``: FSDP's whole trainable weights and optimizer state, which ``checkpoint`` saves.

FSDP is alignkit's own ``torch.distributed.fsdp.fully_shard`` (FSDP2), not accelerate's plugin:
accelerate 1.15 applies its plugin only on accelerator devices (on CPU it silently leaves the model
unwrapped), so going through it would test on CPU a path users never run on GPUs. ``fsdp.yaml``
only tells alignkit to shard (``common.make_accelerator`` builds a plain multi-process Accelerator).

DeepSpeed is imported only under DeepSpeed (``pip install alignkit[deepspeed]``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from alignkit.generation.sampling import synchronised_stop

FSDP_ENV = "ACCELERATE_USE_FSDP"  # set by `accelerate launch` with examples/accelerate/fsdp.yaml


def fsdp_setting(key: str, default: str) -> str:
    """A key of the accelerate FSDP config, as ``accelerate launch`` exports it (``FSDP_<KEY>``)."""
    return os.environ.get(f"FSDP_{key}", default).lower()


def backend(accelerator: Accelerator) -> str:
    """``single``, ``ddp``, ``zero2``, ``zero3`` (``zero0``/``zero1``) or ``fsdp``: how the run is spread."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return f"zero{accelerator.state.deepspeed_plugin.zero_stage}"
    if accelerator.num_processes == 1:
        return "single"
    return "fsdp" if os.environ.get(FSDP_ENV, "false").lower() == "true" else "ddp"


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def is_fsdp(accelerator: Accelerator) -> bool:
    return backend(accelerator) == "fsdp"


def check_supported(accelerator: Accelerator, lora_reward: bool = False, vllm: bool = False,
                    frozen_reference: bool = False) -> None:
    """Refuse, on every rank before anything is prepared, what alignkit does not run sharded."""
    name = backend(accelerator)
    if name == "zero3" and frozen_reference:
        raise NotImplementedError(
            "A DPO/KTO reference kept as its own frozen copy (finetuning_type: full, or ref_model) is not run "
            "under ZeRO-3: zero.Init loads it partitioned and, outside DeepSpeed's engine, nothing gathers it. "
            "Use finetuning_type: lora without ref_model (the reference is the policy with its adapter disabled), "
            "or train under ZeRO-2 or FSDP (deepspeed_zero2.yaml, fsdp.yaml)."
        )
    if name in ("zero3", "fsdp") and lora_reward:
        raise NotImplementedError(
            f"reward_model_type: lora scores on a background thread with the policy's own ({name} sharded) "
            f"weights, whose gathers would interleave with the trainer's collectives. Under {name} use a full "
            "reward model (reward_model_type: full), a rule, or an API reward; or train under ZeRO-2 or DDP."
        )
    if name in ("zero3", "fsdp") and vllm:
        raise NotImplementedError(
            f"rollout_engine: vllm cannot take weights from a {name} sharded policy yet; use rollout.engine: "
            "vllm_server (LoRA: vLLM servers that load the adapter), rollout_engine: hf (alignkit gathers the policy "
            "once per rollout), or train under ZeRO-2 or DDP."
        )
    if name == "fsdp":
        check_fsdp_settings()


def check_fsdp_settings() -> None:
    """The fsdp.yaml keys alignkit's own FSDP2 honours: fsdp_reshard_after_forward (and the accelerate
    mixed_precision); a key asking for what it does not do is refused rather than ignored."""
    refused = {
        "fsdp_version": (fsdp_setting("VERSION", "2") != "2", "alignkit shards with FSDP2 only: set fsdp_version: 2"),
        "fsdp_offload_params": (fsdp_setting("OFFLOAD_PARAMS", "false") == "true",
                                "parameter offload is not wired up: set fsdp_offload_params: false, or use "
                                "deepspeed_zero3.yaml with offload_param_device: cpu"),
        "fsdp_activation_checkpointing": (fsdp_setting("ACTIVATION_CHECKPOINTING", "false") == "true",
                                          "set fsdp_activation_checkpointing: false (alignkit does not apply it)"),
    }
    for key, (bad, what) in refused.items():
        if bad:
            raise NotImplementedError(f"{key} in the accelerate FSDP config: {what}.")


def shard(accelerator: Accelerator, model: nn.Module) -> None:
    """FSDP: ``fully_shard`` every transformer block and every Hugging Face model inside ``model``
    (innermost first), then ``model`` itself, in place. Call it before building the optimizer:
    ``fully_shard`` replaces each parameter by its DTensor shard.

    The (outermost) Hugging Face models are units of their own because PPO calls ``ac.lm`` directly (rollout,
    reference pass with the adapter off), never through the root's forward; their hooks then gather
    the embeddings. The blocks are the classes the model lists in ``_no_split_modules``."""
    if not is_fsdp(accelerator):
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import PreTrainedModel

    blocks = {name for m in model.modules() for name in getattr(m, "_no_split_modules", None) or []}
    # The outermost Hugging Face model only: tied embeddings and lm_head must share one unit.
    hf = [m for m in model.modules() if isinstance(m, PreTrainedModel)]
    hf = [m for m in hf if not any(m is not o and any(m is x for x in o.modules()) for o in hf)]
    groups = [[m] for m in hf if m is not model]
    # A reward model's forward calls its backbone (the transformer without the LM head) directly, so
    # the outer model's hooks would never gather the embeddings: the backbone is the unit there, in one
    # group with the (unused) modules outside it that hold a tied weight (FSDP2 refuses a split tie).
    if isinstance(entry := getattr(model, "backbone", None), PreTrainedModel) and not any(entry is m for m in hf):
        groups = [[entry, *tied_outside(hf[0], entry)]]
    units = [[m] for m in model.modules() if m is not model and type(m).__name__ in blocks]
    # bf16 weights for the forward, fp32 master weights and gradient reduction (as accelerate's bf16).
    mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if accelerator.mixed_precision == "bf16" else \
        MixedPrecisionPolicy()
    # Each rank seeded its own freshly initialised weights (LoRA A, value head); as DDP does, every
    # rank starts from rank 0's. The frozen weights come from the same files everywhere.
    for p in model.parameters():
        if p.requires_grad:
            torch.distributed.broadcast(p.data, src=0)
    for group in [*reversed(units), *groups]:  # innermost first: blocks, then the Hugging Face models
        fully_shard(group if len(group) > 1 else group[0], reshard_after_forward=reshard_after_forward(), mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    # FSDP2 takes as root the first unit to run forward; PPO's first forward is a rollout through
    # ac.lm, which would then wrongly be the root. Settle it now (FSDP2 has no public call for this).
    model._get_fsdp_state()._lazy_init()


def tied_outside(outer: nn.Module, inner: nn.Module) -> list[nn.Module]:
    """The modules of ``outer`` outside ``inner`` owning a parameter that is also ``inner``'s (a tied LM head)."""
    own = {id(p) for p in inner.parameters()}
    inside = {id(m) for m in inner.modules()}
    return [m for m in outer.modules() if id(m) not in inside
            and any(id(p) in own for p in m.parameters(recurse=False))]


def reshard_after_forward() -> bool:
    return fsdp_setting("RESHARD_AFTER_FORWARD", "true") in ("true", "1", "full_shard")


def prepare(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer
            ) -> tuple[nn.Module, torch.optim.Optimizer]:
    """``accelerator.prepare`` (DDP, DeepSpeed), or under FSDP the model ``shard`` already wrapped and
    the plain optimizer (torch's state-dict helpers need the optimizer itself)."""
    if is_fsdp(accelerator):
        return model, optimizer
    return accelerator.prepare(model, optimizer)


def grad_norm_value(norm: torch.Tensor) -> float:
    """The total gradient norm ``clip_grad_norm_`` returned, as a float (a DTensor under FSDP)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def configure(accelerator: Accelerator, micro_batch_size: int, accumulation: int, max_grad_norm: float) -> None:
    """Make the DeepSpeed config agree with the alignkit config before ``accelerator.prepare``: the
    accelerate YAML cannot know the stage's micro-batch, and clipping is alignkit's ``max_grad_norm``."""
    if not is_deepspeed(accelerator):
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = micro_batch_size
    ds["gradient_accumulation_steps"] = accumulation
    ds["train_batch_size"] = micro_batch_size * accumulation * accelerator.num_processes
    ds["gradient_clipping"] = max(max_grad_norm, 0.0)  # DeepSpeed clips inside its step; 0 = off
    accelerator.gradient_accumulation_steps = accumulation


def backward(accelerator: Accelerator, model: nn.Module, loss: torch.Tensor, last: bool) -> None:
    """Backward of one micro-batch's loss, already weighted for accumulation.

    DeepSpeed: the engine reduces gradients and steps its optimizer (clipping included) at the
    boundary, here the last micro-batch, and must not divide the loss by its accumulation steps
    again. Elsewhere the caller's ``optimizer.step()`` does the step."""
    if is_deepspeed(accelerator):
        model.set_gradient_accumulation_boundary(last)
        model.backward(loss, scale_wrt_gas=False)
        if last:
            model.step()
    else:
        accelerator.backward(loss)


@contextmanager
def gathered(accelerator: Accelerator, params: list[nn.Parameter]) -> Iterator[None]:
    """Under ZeRO-3, ``params`` whole on every rank inside the block (a collective: all ranks enter);
    elsewhere they already are."""
    if backend(accelerator) != "zero3":
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


@contextmanager
def rollout_context(accelerator: Accelerator, engine: nn.Module, module: nn.Module) -> Iterator[None]:
    """One rollout of ``module`` (part of the prepared ``engine``'s model) with its weights gathered once.

    ZeRO-3's hooks fetch each layer before its forward and release it after, so sampling R tokens
    would all-gather every layer R+1 times. Here the weights are gathered once and the hooks are
    taken off for the rollout, then put back (as TRL's ``unwrap_model_for_generation``). Without
    hooks no collective runs inside the rollout, so ranks may stop sampling at different lengths.
    The gathered model must fit on one device, as for any generation.

    FSDP: every unit is unsharded once and kept so (no reshard after each forward) for the rollout,
    so the hooks that still run find the weights there; the stop is synchronised over ranks anyway
    (``synchronised_stop``), so a rank never leaves the decode loop while another runs a forward."""
    if backend(accelerator) == "fsdp":
        with unsharded(engine), synchronised_stop():
            yield
        return
    if backend(accelerator) != "zero3":
        yield
        return
    offload = engine.optimizer.parameter_offload  # DeepSpeed's DeepSpeedZeRoOffload: owns the hooks
    with gathered(accelerator, list(module.parameters())):
        for p in engine.module.parameters():
            p.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)  # DeepSpeed >= 0.16.4's name


@contextmanager
def unsharded(root: nn.Module) -> Iterator[None]:
    """FSDP: all of ``root``'s weights whole on every rank inside the block (a collective)."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in units:
            m.reshard()  # the root never reshards after forward (FSDP2's default for it)
            m.set_reshard_after_forward(reshard_after_forward() and m is not root, recurse=False)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict]:
    """FSDP: the trainable weights (and optimizer state), whole, on rank 0's CPU; empty elsewhere
    (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    if optimizer is None:
        return get_model_state_dict(model, options=options), {}
    return get_state_dict(model, optimizer, options=options)


@contextmanager
def full_weights(accelerator: Accelerator, model: nn.Module) -> Iterator[None]:
    """Inside the block, rank 0's save functions (``save_pretrained``, ``state_dict``, a head's
    ``.weight``) see the whole trained weights (a collective: all ranks enter). ZeRO-3 gathers them;
    FSDP gathers the trainable weights to rank 0 and puts them in place of the local shards there."""
    name = backend(accelerator)
    if name == "zero3":
        with gathered(accelerator, [p for p in accelerator.unwrap_model(model).parameters() if p.requires_grad]):
            yield
        return
    if name != "fsdp":
        yield
        return
    full, _ = full_state(model)
    if not accelerator.is_main_process:
        yield
        return
    with plain_parameters(model, full):
        yield


@contextmanager
def plain_parameters(model: nn.Module, full: dict[str, torch.Tensor]) -> Iterator[None]:
    """FSDP: each parameter of ``model`` named in ``full`` replaced, inside the block, by a plain
    parameter holding that whole tensor (tied parameters stay one), then the DTensor shard put back.

    Whatever a save reads (``state_dict`` through peft or transformers, or a parameter directly, as
    the reward model's score head) is then the whole weight. No forward may run inside the block."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():  # sharded state: FSDP's state_dict pre-hook then leaves the swap alone
        if isinstance(m, FSDPModule):
            m.reshard()
    names = {id(p): n for n, p in model.named_parameters()}
    plain: dict[int, nn.Parameter] = {}
    swapped = []
    for module in model.modules():
        for local, p in list(module._parameters.items()):
            if p is not None and names.get(id(p)) in full:
                if id(p) not in plain:
                    whole = full[names[id(p)]]
                    # A view into a larger gathered buffer: safetensors refuses to save a partial storage.
                    whole = whole.clone() if whole.untyped_storage().nbytes() != whole.nbytes else whole
                    plain[id(p)] = nn.Parameter(whole, requires_grad=p.requires_grad)
                swapped.append((module, local, p))
                module._parameters[local] = plain[id(p)]
    try:
        yield
    finally:
        for module, local, p in swapped:
            module._parameters[local] = p
