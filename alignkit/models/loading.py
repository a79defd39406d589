"""Load models and tokenizers from local directories; the one builder of the model a stage trains.

``build_policy_model`` (base + merged adapters + gradient checkpointing + a float32 LoRA through
peft) serves SFT, RM and PPO; ``load_base`` gives the frozen base (PPO's full fine-tuning
reference). Weights on disk (save, restore, shards) live in ``alignkit.models.io``; what differs
between model families (Auto class, LoRA targets, MoE router loss) in ``alignkit.models.architectures``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoTokenizer, PreTrainedModel

from alignkit.config import StageConfig
from alignkit.models.architectures import auto_class_for, freeze_multimodal, is_vision_language, lora_targets
from alignkit.models.gguf import is_gguf, resolve_model_path

logger = logging.getLogger(__name__)


def model_dtype(bf16: bool, fp16: bool) -> torch.dtype:
    """bf16/fp16 when asked; float32 otherwise (the only sensible choice on CPU)."""
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32


def check_model_dir(path: str, what: str = "model_name_or_path") -> Path:
    """``path`` as a model directory; a ``.gguf`` file is converted once (cached) and its directory returned."""
    if is_gguf(path) and Path(path).is_file():
        return Path(resolve_model_path(path))
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(
            f"{what}: {path!r} is not a local directory (nor a .gguf file). alignkit loads models from disk; "
            "download the model first (e.g. `hf download ORG/NAME --local-dir DIR`)."
        )
    return p


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """Tokenizer with left padding (for batched generation) and a pad token.

    A pad token equal to EOS is tolerated: alignkit derives masks from attention masks and
    the first EOS position, never from ``token == pad_id``.
    """
    path = str(check_model_dir(path))
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_causal_lm(
    path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, device: str | None = None
) -> PreTrainedModel:
    """The checkpoint's language model with its LM head: a causal LM, or an image-text-to-text
    model (Qwen3-VL ...) through its own Auto class; an unsupported architecture is an error naming it."""
    path = str(check_model_dir(path))
    cls = auto_class_for(path, trust_remote_code)
    model = cls.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.to(device) if device else model


def lora_config(model: torch.nn.Module, rank: int, alpha: int, dropout: float, target: list[str],
                train_vision_tower: bool = False, train_projector: bool = False) -> LoraConfig:
    """peft config; with ``all`` on a MoE model, the fused expert weights as ``target_parameters``."""
    modules, parameters = lora_targets(model, target, train_vision_tower, train_projector)
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=modules,
        target_parameters=parameters or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora(model: PreTrainedModel, cfg: StageConfig, adapter_path: str | None = None) -> PeftModel:
    """A trainable LoRA adapter (``cfg``'s rank, alpha, dropout, targets): a new one, or continued
    from ``adapter_path``; its weights in float32 (``trainable_in_float32``)."""
    if adapter_path is not None:
        check_model_dir(adapter_path, "adapter_name_or_path")
        model = PeftModel.from_pretrained(model, adapter_path, is_trainable=True)
    else:
        model = get_peft_model(model, lora_config(model, cfg.lora_rank, cfg.alpha, cfg.lora_dropout, cfg.lora_target,
                                                  not cfg.freeze_vision_tower, not cfg.freeze_multi_modal_projector))
    trainable_in_float32(model)
    return model


def merge_adapters(model: PreTrainedModel, adapter_paths: list[str]) -> PreTrainedModel:
    """Apply adapters in order, merging each into the weights (SFT adapter, then PPO adapter)."""
    for path in adapter_paths:
        check_model_dir(path, "adapter_name_or_path")
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    return model


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # With a frozen base, inputs to the first checkpointed block need grads for LoRA to get any.
    model.enable_input_require_grads()
    model.config.use_cache = False


def trainable_in_float32(model: torch.nn.Module) -> None:
    """Keep trainable (adapter) weights in float32 even on a bf16/fp16 base, for stable Adam updates."""
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def load_base(cfg: StageConfig, adapters: list[str] | None = None) -> PreTrainedModel:
    """``cfg``'s base model in its dtype, with ``adapters`` merged in order (default: every
    ``adapter_name_or_path``, i.e. the SFT model a PPO run starts from and is held to)."""
    model = load_causal_lm(cfg.model_name_or_path, model_dtype(cfg.bf16, cfg.fp16), cfg.trust_remote_code)
    return merge_adapters(model, list(cfg.adapter_name_or_path or []) if adapters is None else adapters)


def split_adapters(cfg: StageConfig, merge_all: bool = False) -> tuple[list[str], str | None]:
    """``adapter_name_or_path`` as (merged into the base, continued as the trainable LoRA)."""
    adapters = list(cfg.adapter_name_or_path or [])
    if cfg.finetuning_type == "lora" and adapters and not merge_all:
        return adapters[:-1], adapters[-1]
    return adapters, None


def build_policy_model(cfg: StageConfig, merge_all: bool = False) -> PreTrainedModel | PeftModel:
    """The model a stage trains: base + merged adapters, gradient checkpointing if set, and with
    LoRA a trainable float32 adapter.

    ``merge_all=False`` (SFT, RM): with LoRA, every adapter but the last is merged and training
    continues the last one. ``merge_all=True`` (PPO): every adapter is merged and the policy LoRA
    is new, so disabling it gives the SFT reference. Full fine-tuning always merges every adapter.
    """
    merged, continued = split_adapters(cfg, merge_all)
    model = load_base(cfg, merged)
    if cfg.finetuning_type == "full":  # peft leaves the base it merged an adapter into frozen
        model.requires_grad_(True)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if is_vision_language(model):
        freeze_multimodal(model, cfg.freeze_vision_tower, cfg.freeze_multi_modal_projector)
    if cfg.finetuning_type == "lora":
        model = attach_lora(model, cfg, continued)
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
