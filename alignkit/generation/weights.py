"""What a weight sync sends: the policy as a plain HF state dict (its LoRA adapter merged), only
the modules an update can change, widened to the layers an engine fuses; and the check that
an engine's log-probs still match the trainer's.

Any engine that holds its own copy of the weights (colocated vLLM, vLLM servers) uses these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

POLICY_ADAPTER = "default"


def policy_lm(policy: nn.Module) -> nn.Module:
    """The language model inside an ``ActorCritic`` (its ``lm``), or the model itself."""
    return getattr(policy, "lm", policy)


def plain_model(lm: nn.Module) -> tuple[nn.Module, bool]:
    from peft import PeftModel

    return (lm.get_base_model(), True) if isinstance(lm, PeftModel) else (lm, False)


def trainable_modules(lm: nn.Module) -> set[str]:
    """Names (plain-model naming) of the modules whose weights an optimizer step can change:
    the policy adapter's LoRA layers, or for full fine-tuning every module with a trainable
    parameter. LoRA is decided by adapter, not ``requires_grad``, which peft toggles when other
    adapters (critic, reward) are switched in."""
    from peft.tuners.lora import LoraLayer

    model, is_lora = plain_model(lm)
    if is_lora:
        return {name for name, m in model.named_modules() if isinstance(m, LoraLayer) and POLICY_ADAPTER in _adapters(m)}
    return {name for name, m in model.named_modules() if any(p.requires_grad for p in m.parameters(recurse=False))}


def _adapters(layer) -> set[str]:
    return set(layer.lora_A) | set(getattr(layer, "lora_embedding_A", {}))


def merged_weights(lm: nn.Module, modules: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The policy as a plain HF state dict (contiguous CPU copies), LoRA adapter "default" merged:
    ``W + delta`` with peft's own ``get_delta_weight`` (scale, fan-in/fan-out), computed out of
    place. ``modules``: only these modules' parameters. Tied weights appear once (the input
    embedding), since both names must carry identical values."""
    from peft.tuners.lora import LoraLayer

    model, _ = plain_model(lm)
    out: dict[str, torch.Tensor] = {}
    lora_prefixes = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        lora_prefixes.append(name + ".")
        if modules is not None and name not in modules:
            continue
        if getattr(module, "use_dora", {}).get(POLICY_ADAPTER, False):
            raise NotImplementedError(f"weight sync of DoRA adapters ({name}); use plain LoRA with rollout.engine: vllm")
        for pname, p in module.get_base_layer().named_parameters(recurse=False):
            value = p.detach()
            if pname == "weight" and POLICY_ADAPTER in _adapters(module) and not module.merged:
                value = (value.float() + module.get_delta_weight(POLICY_ADAPTER).float()).to(p.dtype)
            out[f"{name}.{pname}"] = value
    for name, p in model.named_parameters():  # deduplicated: a tied lm_head is not listed
        if any(name.startswith(pre) for pre in lora_prefixes):
            continue
        if "modules_to_save" in name or "original_module" in name:
            raise NotImplementedError(f"weight sync of peft modules_to_save ({name})")
        if modules is None or name.rpartition(".")[0] in modules:
            out[name] = p.detach()
    return {k: v.to("cpu").contiguous() for k, v in out.items()}  # safetensors.save copies them


def widen_to_fused(modules: set[str], packed: dict[str, list[str]]) -> set[str]:
    """Add the siblings that vLLM fuses with each module into one layer (``packed``: its
    ``packed_modules_mapping``), so a reload never gets part of a layer's weights."""
    groups = [members for members in packed.values() if len(members) > 1]
    out = set(modules)
    for name in modules:
        parent, _, leaf = name.rpartition(".")
        for members in groups:
            if leaf in members:
                out.update(f"{parent}.{m}" if parent else m for m in members)
    return out


def logprob_diff(engine_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor, mask: torch.Tensor) -> float:
    """Sync check: mean |engine - trainer| log-prob over response tokens, (B, R) each -> float.

    Compare like with like: ``Rollout.logprobs`` are under the sampling distribution, so with
    top-k/top-p on, the trainer's side must be computed from ``filter_logits(logits / T, ...)``.
    """
    m = mask.bool()
    # where, not a product: off the mask a filtered distribution can give -inf (and -inf * 0 = nan).
    diff = torch.where(m, (engine_logprobs.float() - trainer_logprobs.float()).abs(), 0.0)
    return float(diff.sum() / m.sum().clamp(min=1))


@dataclass(frozen=True)
class SyncCheck:
    """How far an engine's log-probs of the tokens it sampled are from the trainer's, against the
    engine's tolerance. A stale or wrong weight sync shows here first; the loop stops on ``not ok``."""

    logprob_diff: float  # mean |engine - trainer| log-prob per response token
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.logprob_diff <= self.tolerance

    def error(self) -> str:
        return (f"the rollout engine's log-probs differ from the trainer's by {self.logprob_diff:.4f} per token "
                f"(rollout.sync_tolerance {self.tolerance}): its weights are not the policy's. Check that the "
                "weight sync ran after every update; a dtype mismatch (bf16 engine, fp32 trainer) needs a larger "
                "rollout.sync_tolerance.")


def check_sync(engine_logprobs: list[torch.Tensor | None], trainer_logprobs: list[torch.Tensor],
               masks: list[torch.Tensor], filtered: bool, tolerance: float) -> SyncCheck | None:
    """A ``SyncCheck`` over chunks of (b, R) tensors, or None when the engine reported no log-probs
    or sampled with top-k/top-p (``filtered``): only without them are both log-softmax(logits / T)
    of the same weights."""
    if filtered or any(lp is None for lp in engine_logprobs):
        return None
    diff = sum(logprob_diff(e, t, m) * float(m.sum()) for e, t, m in zip(engine_logprobs, trainer_logprobs, masks,
                                                                         strict=True))
    n = sum(float(m.sum()) for m in masks)
    return SyncCheck(diff / max(n, 1.0), tolerance)
