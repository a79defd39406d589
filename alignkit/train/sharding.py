"""What changes when the model is sharded (DeepSpeed ZeRO-2/3): in one place, so that the SFT/RM
loop and the PPO loop read the same under DDP and under ZeRO.

- ``check_supported``: the combinations alignkit runs, or one paragraph saying what to do instead.
- ``configure``: the DeepSpeed config takes its batch sizes and clipping from the alignkit config.
- ``backward``: accumulation with DeepSpeed's engine (it owns the reduce and the optimizer step).
- ``gathered`` / ``rollout_context``: full parameters on every rank for a save or for one whole
  rollout (ZeRO-3 otherwise gathers each layer again for every generated token).
- ``save_checkpoint``: every rank writes its optimizer shard (``accelerator.save_state``) next to the
  plain model files rank 0 writes; ``common.resume`` reads them back.

DeepSpeed is imported only under DeepSpeed (``pip install alignkit[deepspeed]``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from alignkit.runs import CHECKPOINT_PREFIX
from alignkit.train import checkpoint
from alignkit.train.checkpoint import SHARDS
from alignkit.train.common import backend, rank_rng_states


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def check_supported(accelerator: Accelerator, lora_reward: bool = False, vllm: bool = False,
                    ppo_accumulation: int = 1) -> None:
    """Refuse, on every rank before anything is prepared, what alignkit does not run sharded."""
    name = backend(accelerator)
    if is_deepspeed(accelerator) and ppo_accumulation > 1:
        raise NotImplementedError(
            f"PPO under DeepSpeed ({name}) runs one backward per optimizer step: DeepSpeed's engine steps after "
            f"every backward of the PPO update. Set gradient_accumulation_steps: 1 (it is {ppo_accumulation}) and "
            "multiply per_device_train_batch_size by it instead: the same mini-batch, in one micro-batch."
        )
    if name == "zero3" and lora_reward:
        raise NotImplementedError(
            "reward_model_type: lora scores on a background thread with the policy's own (ZeRO-3 sharded) "
            "weights, whose gathers would interleave with the trainer's collectives. Under ZeRO-3 use a full "
            "reward model (reward_model_type: full), a rule, or an API reward; or train under ZeRO-2 or DDP."
        )
    if name == "zero3" and vllm:
        raise NotImplementedError(
            "rollout_engine: vllm cannot take weights from a ZeRO-3 sharded policy yet; use rollout_engine: hf "
            "(alignkit gathers the policy once per rollout) or train under ZeRO-2 or DDP."
        )


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
    The gathered model must fit on one device, as for any generation."""
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


def save_checkpoint(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, out: Path,
                    step: int, write_model: Callable[[Path], None], state: dict[str, Any], limit: int | None) -> None:
    """Write ``checkpoint-{step}`` (a collective: every rank calls it).

    ``state`` is what else rank 0 stores (scheduler, KL controller, ...). The optimizer state goes
    in it when it is whole on every rank (DDP); under ZeRO every rank writes its shards instead
    (``accelerator.save_state``: DeepSpeed's own checkpoint of weights and optimizer) into a folder
    that rank 0 moves into the checkpoint before the rename that makes it complete."""
    shards = None
    if is_deepspeed(accelerator):
        shards = out / f".{CHECKPOINT_PREFIX}{step}-{SHARDS}"
        accelerator.save_state(str(shards))
    else:
        state = {**state, "optimizer": optimizer.state_dict()}
    rngs = rank_rng_states(accelerator)  # collective; each rank resumes its own sampling/dropout stream

    def write(d: Path) -> None:
        write_model(d)
        if shards is not None:
            shards.rename(d / SHARDS)

    trainable = [p for p in accelerator.unwrap_model(model).parameters() if p.requires_grad]
    with gathered(accelerator, trainable):
        if accelerator.is_main_process:
            checkpoint.save_checkpoint(out, step, write, {**state, "rng_per_rank": rngs,
                                                          "backend": backend(accelerator)}, limit)
    accelerator.wait_for_everyone()
    if shards is not None and accelerator.is_main_process:
        shutil.rmtree(shards, ignore_errors=True)  # left only if rank 0's write failed
