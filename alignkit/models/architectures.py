"""The model families alignkit trains, and what differs between them.

Three questions are answered here and nowhere else: which transformers Auto class loads a
checkpoint (a causal LM, or an image-text-to-text model whose language model is trained),
which weights ``lora_target: all`` adapts (every linear layer and fused expert weight, never a
MoE router or a frozen vision tower), and how a tiny random model of each family is configured.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    DeepseekV3Config,
    Gemma3TextConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
    Qwen3VLConfig,
    Qwen3VLMoeConfig,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
)

# Module names (path components) of a VL model's vision encoder and of the projector that maps
# its features into the language model (Qwen2/2.5/3-VL: ``visual`` holds both, the projector as
# ``merger``/``deepstack_merger_list``; LLaVA/Gemma 3: ``vision_tower`` + ``multi_modal_projector``).
VISION_TOWER = ("visual", "vision_tower", "vision_model")
PROJECTOR = ("merger", "deepstack_merger_list", "multi_modal_projector", "mm_projector")
# MoE routers: a gate over experts is not a linear layer to adapt. LoRA on it shifts the load
# balance the base was trained with (LLaMA-Factory's `all` excludes it too); name it to adapt it.
ROUTERS = ("gate", "router", "shared_expert_gate")
# Heads that are not part of the language model's body.
HEADS = ("lm_head", "score", "v_head", "summary")

VL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


# ---------------------------------------------------------------- loading by what the checkpoint is


def model_type_of(path: str | Path) -> tuple[str, list[str]]:
    """``model_type`` and ``architectures`` from a checkpoint's config.json."""
    raw = json.loads((Path(path) / "config.json").read_text())
    return raw.get("model_type", "?"), list(raw.get("architectures") or [])


def auto_class_for(path: str | Path, trust_remote_code: bool = False):
    """The Auto class that loads this checkpoint with its language-model head.

    Causal LMs load as ``AutoModelForCausalLM``; vision-language models (Qwen3-VL, Qwen3-VL-MoE,
    Gemma 3 with a vision tower) as ``AutoModelForImageTextToText``, whose text forward alignkit
    trains. Custom code (``trust_remote_code``) is loaded as a causal LM, as its auto_map says.
    """
    model_type, archs = model_type_of(path)
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and model_type not in ("gemma3_text",):
        return AutoModelForImageTextToText
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or trust_remote_code:
        return AutoModelForCausalLM
    raise ValueError(
        f"model_name_or_path: {path} is a {model_type!r} checkpoint ({', '.join(archs) or 'no architectures'}), "
        "which is neither a causal language model nor an image-text-to-text model in this transformers "
        "version; alignkit cannot train it (see docs/models.md for the supported families)."
    )


def is_vision_language(model: torch.nn.Module) -> bool:
    return any(_in_part(name, VISION_TOWER) for name, _ in model.named_modules())


def _in_part(name: str, parts: tuple[str, ...]) -> bool:
    return any(p in parts for p in name.split("."))


def freeze_multimodal(model: torch.nn.Module, vision_tower: bool, projector: bool) -> int:
    """Stop gradients into the vision tower and/or projector (full fine-tuning; with LoRA the base is
    frozen anyway and ``lora_targets`` leaves them out). Returns the number of frozen tensors."""
    frozen = 0
    for name, p in model.named_parameters():
        is_projector = _in_part(name, PROJECTOR)
        if (projector and is_projector) or (vision_tower and not is_projector and _in_part(name, VISION_TOWER)):
            p.requires_grad_(False)
            frozen += 1
    return frozen


# ---------------------------------------------------------------- LoRA targets


def lora_targets(model: torch.nn.Module, lora_target: list[str], train_vision_tower: bool = False,
                 train_projector: bool = False) -> tuple[list[str] | str, list[str]]:
    """``(target_modules, target_parameters)`` for peft's ``LoraConfig``.

    An explicit list is passed through. ``all`` expands to the linear layers of the language model
    (minus heads and MoE routers; plus the vision tower / projector when they are trained) and to
    the fused 3-D expert weights of MoE blocks (transformers 5 stores experts as one
    ``(num_experts, out, in)`` parameter, which peft adapts through ``target_parameters``).
    """
    if lora_target != ["all"]:
        return lora_target, []
    output = model.get_output_embeddings()
    skip = set(HEADS) | set(ROUTERS)
    kept, excluded = set(), set()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is output:
            continue
        leaf = name.split(".")[-1]
        frozen_part = (_in_part(name, PROJECTOR) and not train_projector) or (
            _in_part(name, VISION_TOWER) and not _in_part(name, PROJECTOR) and not train_vision_tower)
        (excluded if frozen_part or leaf in skip else kept).add(name if frozen_part else leaf)
    leaves = sorted(kept - skip)
    # A leaf name shared with a frozen module (a vision block's ``down_proj``) needs full paths.
    if any(n.split(".")[-1] in kept for n in excluded if "." in n):
        modules: list[str] | str = rf"^(?!.*\.({'|'.join(VISION_TOWER)})\.).*\.({'|'.join(leaves)})$"
    else:
        modules = leaves
    return modules, expert_parameters(model)


def expert_parameters(model: torch.nn.Module) -> list[str]:
    """``experts.<weight>`` suffixes of fused MoE expert tensors (3-D parameters of an experts module)."""
    names = set()
    for mod_name, module in model.named_modules():
        if not mod_name.endswith("experts"):
            continue
        for p_name, p in module.named_parameters(recurse=False):
            if p.dim() == 3:
                names.add(f"{mod_name.split('.')[-1]}.{p_name}")
    return sorted(names)


def router_modules(model: torch.nn.Module) -> list[str]:
    """Full names of MoE router modules (for tests and docs: these are never ``all`` targets)."""
    return [n for n, m in model.named_modules() if n.split(".")[-1] in ROUTERS and "Router" in type(m).__name__
            or n.split(".")[-1] in ROUTERS and isinstance(m, torch.nn.Linear)]


# ---------------------------------------------------------------- router auxiliary loss


def has_router_aux_loss(model: torch.nn.Module) -> bool:
    """True for MoE models whose forward can return a load-balancing loss (``output_router_logits``)."""
    config = getattr(getattr(model, "module", model), "config", None)  # DDP wraps the model as .module
    if config is None:
        return False
    return hasattr(config.get_text_config(), "output_router_logits")


def forward_with_aux(model: torch.nn.Module, coef: float, **inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logits, aux_loss * coef)``; the second is None unless ``coef > 0`` and the model is a MoE
    (``router_aux_loss`` on the router logits of the same forward, over ``attention_mask``'s tokens)."""
    if coef > 0 and has_router_aux_loss(model):
        out = model(**inputs, output_router_logits=True)
        return out.logits, coef * router_aux_loss(model, out.router_logits, inputs.get("attention_mask"))
    return model(**inputs).logits, None


def router_aux_loss(model: torch.nn.Module, router_logits: tuple[torch.Tensor, ...],
                    attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The router load-balancing loss (Switch Transformer eq. 4-6) as the model's own transformers
    family computes it: its modeling module's ``load_balancing_loss_func`` on one (B*T, E) logits
    tensor per MoE layer, padding excluded through the (B, T) ``attention_mask``.

    One function for every stage: a causal LM's head returns the same value as ``aux_loss``, but a
    bare backbone (the reward model's, which drops the LM head) returns only the router logits.
    """
    loss_fn = _balance_loss_function(model)
    top_k = _unwrap(model).config.get_text_config().num_experts_per_tok
    return loss_fn(tuple(router_logits), router_logits[0].shape[-1], top_k, attention_mask)


def _balance_loss_function(model: torch.nn.Module) -> Callable:
    """``load_balancing_loss_func`` of the module that defines the model's class; an error for a
    family that has none rather than a coefficient that silently weights nothing."""
    base = _unwrap(model)
    loss_fn = getattr(sys.modules.get(type(base).__module__), "load_balancing_loss_func", None)
    if loss_fn is None:
        raise ValueError(
            f"moe_aux_loss_coef: {type(base).__name__} computes no router load-balancing loss in transformers "
            f"(its module {type(base).__module__} has no load_balancing_loss_func; DeepSeek-V3 balances its "
            "experts without an auxiliary loss, through the router's per-expert bias), so there is nothing to "
            "weight. Set moe_aux_loss_coef: 0 for this model."
        )
    return loss_fn


# ---------------------------------------------------------------- image inputs (Qwen-VL)


def image_forward_kwargs(model: torch.nn.Module, input_ids: torch.Tensor, pixels: dict | None) -> dict:
    """Forward kwargs that put a batch's images into a Qwen-VL model: ``pixel_values`` and
    ``image_grid_thw`` (``pixels``) plus ``mm_token_type_ids`` (1 on image tokens), from which
    transformers lays out the 3-D rope positions itself (``get_rope_index``, left or right padding
    read from the attention mask). Empty for a text batch: the forward stays the text one."""
    if not pixels:
        return {}
    image_token_id = _unwrap(model).config.image_token_id
    return {**pixels, "mm_token_type_ids": (input_ids == image_token_id).int()}


def rope_positions(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids of a left-padded batch: (B, T) from the mask for text, or Qwen-VL's (3, B, T)
    temporal/height/width positions when the batch holds images, computed by the model's own
    ``get_rope_index``: the same positions a full forward with ``image_forward_kwargs`` computes,
    so tokens sampled with a KV cache get the log-probs the training passes recompute."""
    text = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    if image_grid_thw is None:
        return text
    inner = next(m for m in _unwrap(model).modules() if hasattr(m, "get_rope_index"))
    image_token_id = _unwrap(model).config.image_token_id
    positions, _ = inner.get_rope_index(input_ids, (input_ids == image_token_id).int(), image_grid_thw=image_grid_thw,
                                        attention_mask=attention_mask)
    return positions


def placeholder_token_ids(model: torch.nn.Module) -> tuple[int, ...]:
    """A VL model's image and video placeholder token ids (none for a text model)."""
    config = _unwrap(model).config
    return tuple(i for i in (getattr(config, "image_token_id", None), getattr(config, "video_token_id", None))
                 if isinstance(i, int))


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under DDP (``.module``) and peft (``get_base_model``) wrappers."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# ---------------------------------------------------------------- tiny configs


def _dense(cls, size: dict, **extra) -> PretrainedConfig:
    return cls(vocab_size=size["vocab_size"], hidden_size=size["hidden_size"],
               intermediate_size=size["intermediate_size"], num_hidden_layers=size["num_layers"],
               num_attention_heads=size["num_heads"], num_key_value_heads=size["num_kv_heads"],
               max_position_embeddings=2048, tie_word_embeddings=size["tie_word_embeddings"], **extra)


def _moe_sizes(size: dict) -> dict:
    # 4 experts, 2 active: small, but routing and the balance loss are real.
    return dict(num_experts_per_tok=2, moe_intermediate_size=size["intermediate_size"] // 2)


def _qwen3_moe(size: dict) -> PretrainedConfig:
    return _dense(Qwen3MoeConfig, size, num_experts=4, head_dim=size["hidden_size"] // size["num_heads"],
                  router_aux_loss_coef=0.001, **_moe_sizes(size))


def _llama3(size: dict) -> PretrainedConfig:
    # Llama 3's RoPE: theta 500k with the "llama3" frequency scaling of the 3.1+ checkpoints.
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}
    return _dense(LlamaConfig, size, rope_parameters=rope)


def _gemma3(size: dict) -> PretrainedConfig:
    head = size["hidden_size"] // size["num_heads"]
    return _dense(Gemma3TextConfig, size, head_dim=head, query_pre_attn_scalar=head, sliding_window=16,
                  layer_types=["sliding_attention" if (i + 1) % 2 else "full_attention"
                               for i in range(size["num_layers"])])


def _deepseek_v3(size: dict) -> PretrainedConfig:
    # Multi-head latent attention (low-rank q, a compressed kv latent; as many kv heads as heads), a dense
    # first layer, then routed + shared experts. The latent keeps the real model's sizes (kv_lora_rank
    # 512 + rope 64 = 576), the only ones vLLM's CPU MLA kernel runs. ``topk_method``/``scoring_func``
    # are not transformers config fields (it always routes so) but the real config.json has them and
    # vLLM reads them: without them it builds a softmax router with no ``e_score_correction_bias``.
    # Untied embeddings, as the real model: vLLM's DeepSeek ignores ``tie_word_embeddings`` (its
    # lm_head would stay zero).
    head = size["hidden_size"] // size["num_heads"]
    size = dict(size, num_kv_heads=size["num_heads"], tie_word_embeddings=False)
    return _dense(DeepseekV3Config, size, n_routed_experts=4, n_shared_experts=1,
                  first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=size["hidden_size"] // 2,
                  kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=head // 2, v_head_dim=head,
                  topk_method="noaux_tc", scoring_func="sigmoid", **_moe_sizes(size))


def _vl(config_cls, text: PretrainedConfig, tok_ids: dict[str, int]) -> PretrainedConfig:
    hidden = text.hidden_size
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[0],
                  num_position_embeddings=64)
    text_dict = {k: v for k, v in text.to_dict().items() if k not in ("model_type", "architectures")}
    return config_cls(text_config=text_dict, vision_config=vision, tie_word_embeddings=text.tie_word_embeddings,
                      **tok_ids)


TinyBuilder = Callable[[dict], PretrainedConfig]

TINY_ARCHS: dict[str, TinyBuilder] = {
    "qwen2": lambda s: _dense(Qwen2Config, s),
    "llama": lambda s: _dense(LlamaConfig, s),
    "llama3": _llama3,
    "qwen3": lambda s: _dense(Qwen3Config, s, head_dim=s["hidden_size"] // s["num_heads"]),
    "qwen3_moe": _qwen3_moe,
    "gemma3": _gemma3,
    "deepseek_v3": _deepseek_v3,
    "qwen3_vl": lambda s: _dense(Qwen3Config, s, head_dim=s["hidden_size"] // s["num_heads"]),
    "qwen3_vl_moe": _qwen3_moe,
}
VL_ARCHS = {"qwen3_vl": Qwen3VLConfig, "qwen3_vl_moe": Qwen3VLMoeConfig}


def tiny_config(arch: str, size: dict, token_ids: dict[str, int]) -> PretrainedConfig:
    """A transformers config of family ``arch`` at ``size`` (vocab, hidden, layers, heads ...);
    ``token_ids`` holds pad/eos (and for VL models the vision token ids) of the tokenizer."""
    if arch not in TINY_ARCHS:
        raise ValueError(f"tiny arch must be one of {', '.join(TINY_ARCHS)}; got {arch!r}")
    text = TINY_ARCHS[arch](size)
    for key in ("pad_token_id", "eos_token_id"):
        setattr(text, key, token_ids[key])
    text.bos_token_id = None
    if arch not in VL_ARCHS:
        return text
    vision_ids = {k: v for k, v in token_ids.items() if k not in ("pad_token_id", "eos_token_id")}
    return _vl(VL_ARCHS[arch], text, vision_ids)


def from_config(config: PretrainedConfig) -> PreTrainedModel:
    cls = AutoModelForImageTextToText if type(config) in VL_ARCHS.values() else AutoModelForCausalLM
    return cls.from_config(config, dtype=torch.float32)
