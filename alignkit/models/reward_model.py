"""A reward model: a causal LM's backbone plus a linear score head read at the last real token.

``save_reward_model`` writes one of two layouts, and ``load_reward_model`` reads both:

- LoRA: the peft adapter, ``score_head.safetensors``, the tokenizer and ``reward_model.json``
  (base model, template, system prompt). Small, and loadable in PPO as a second adapter on the
  policy's own base (``reward_model_type: lora``).
- full: a ``*ForSequenceClassification`` directory (``num_labels=1``, head at ``score.weight``)
  that ``AutoModelForSequenceClassification`` and inference engines load, plus the tokenizer and
  ``reward_model.json``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from huggingface_hub import save_torch_state_dict
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForSequenceClassification
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

from alignkit.models.actor_critic import position_ids_from_mask
from alignkit.models.architectures import has_router_aux_loss, router_aux_loss
from alignkit.models.io import read_weights, restore_model
from alignkit.models.loading import check_model_dir, load_causal_lm, load_tokenizer, merge_adapters

logger = logging.getLogger(__name__)

SCORE_HEAD_FILE = "score_head.safetensors"
META_FILE = "reward_model.json"
TRAIN_HINT = "train one with `alignkit train` and `stage: rm` (see docs/rm.md)"


class RewardModelError(ValueError):
    """A reward model directory that cannot be used; the message says what is missing and what to do."""


def new_score_head(hidden_size: int) -> nn.Linear:
    """``score``: hidden -> 1, no bias (a bias cancels in r_chosen - r_rejected, and HF's
    ``*ForSequenceClassification.score`` has none, so the full layout maps onto it exactly).
    Init std 1/sqrt(hidden+1), as OpenAI's lm-human-preferences reward head (Ziegler et al. 2019)."""
    head = nn.Linear(hidden_size, 1, bias=False)
    nn.init.normal_(head.weight, std=1 / math.sqrt(hidden_size + 1))
    return head


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B,) position of the rightmost real token, for left or right padding.

    Derived from the mask, not from ``token == pad_id``: a pad token equal to EOS (common)
    would otherwise hide the end-of-turn token the score is read at.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def pairwise_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) Bradley-Terry loss ``-log sigmoid(r_c - r_r - margin)`` per pair (Ouyang et al. 2022
    eq. 1; the margin term is Llama 2's, Touvron et al. 2023 sec. 3.2.2)."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin.to(diff)
    return -F.logsigmoid(diff)


class RewardModel(nn.Module):
    """``forward(input_ids, attention_mask)`` -> one scalar reward per sequence, (B,).

    ``model`` is a ``PeftModel`` around a causal LM (LoRA: adapter and head train) or a bare
    backbone such as ``Qwen2Model`` (full: the LM head is not kept, so it is neither trained
    nor reported unused to DDP).
    """

    def __init__(self, model: nn.Module, score: nn.Linear | None = None):
        super().__init__()
        self.model = model
        if score is None:
            score = new_score_head(self.backbone.config.get_text_config().hidden_size)
            score.to(next(model.parameters()).device)
        self.score = score

    @classmethod
    def from_causal_lm(cls, lm: nn.Module) -> RewardModel:
        return cls(lm if isinstance(lm, PeftModel) else lm.base_model)

    @property
    def is_lora(self) -> bool:
        return isinstance(self.model, PeftModel)

    @property
    def backbone(self) -> nn.Module:
        """The transformer without its LM head (LoRA layers, if any, are injected in place)."""
        return self.model.get_base_model().base_model if self.is_lora else self.model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, aux_coef: float = 0.0,
                **images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """(B,) scores; ``images``: a VL batch's pixel inputs (``pixel_values``, ``image_grid_thw``,
        ``mm_token_type_ids``), from which transformers also lays out the 3-D rope positions.

        With ``aux_coef > 0`` (training): ``(scores, aux_coef * router load-balancing loss)``, the
        second None for a dense model. It goes through ``forward`` so DDP sees one call per step.
        """
        with_aux = aux_coef > 0 and has_router_aux_loss(self.backbone)
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=None if images else position_ids_from_mask(attention_mask),
            use_cache=False,
            **({"output_router_logits": True} if with_aux else {}),
            **images,
        )
        hidden = out.last_hidden_state  # (B, T, H)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]  # (B, H)
        scores = self.score(last.to(self.score.weight.dtype)).squeeze(-1).float()  # (B,)
        if aux_coef <= 0:
            return scores
        # The backbone has no LM head, so it returns the router logits but never the loss itself.
        aux = aux_coef * router_aux_loss(self.backbone, out.router_logits, attention_mask) if with_aux else None
        return scores, aux


@torch.no_grad()
def score_sequences(
    rm: nn.Module, seqs: list[list[int]], pad_id: int, batch_size: int = 8, device: torch.device | str | None = None
) -> list[float]:
    """Rewards of token sequences, batched and right-padded (padding does not change a score)."""
    device = device or next(rm.parameters()).device
    out: list[float] = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        length = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for j, s in enumerate(chunk):
            ids[j, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[j, : len(s)] = 1
        out += rm(ids.to(device), mask.to(device)).tolist()
    return out


# Saving and loading ----------------------------------------------------------------------------


def save_reward_model(rm: RewardModel, out: Path, tokenizer=None, meta: dict[str, Any] | None = None) -> None:
    """Write the LoRA or full layout (module docstring) into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if rm.is_lora:
        rm.model.save_pretrained(out, selected_adapters=["default"], safe_serialization=True)
        save_file({"weight": rm.score.weight.detach().cpu().contiguous()}, str(out / SCORE_HEAD_FILE))
    else:
        _save_sequence_classifier(rm, out, tokenizer.pad_token_id if tokenizer is not None else None)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    layout = {"format": "lora" if rm.is_lora else "full"}
    (out / META_FILE).write_text(json.dumps({**(meta or {}), **layout}, indent=2) + "\n")


def _save_sequence_classifier(rm: RewardModel, out: Path, pad_token_id: int | None) -> None:
    backbone = rm.backbone
    config = copy.deepcopy(backbone.config)
    arch = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(config.model_type)
    if arch is None:
        raise RewardModelError(
            f"model type {config.model_type!r} has no *ForSequenceClassification class in transformers, so a "
            "full reward model cannot be saved in that layout; use finetuning_type: lora"
        )
    config.architectures = [arch]
    config.num_labels = 1
    if pad_token_id is not None:
        # HF's sequence classifier finds the last token by pad-id; without one it refuses batches.
        config.pad_token_id = pad_token_id
    config.save_pretrained(out)
    # The key layout of *ForSequenceClassification: "<base_model_prefix>.<backbone key>" + "score.weight".
    prefix = getattr(transformers, arch).base_model_prefix
    state = {f"{prefix}.{k}": v.detach().cpu() for k, v in backbone.state_dict().items()}
    state["score.weight"] = rm.score.weight.detach().cpu()
    save_torch_state_dict(state, out)


def load_score_head(path: str | Path, hidden_size: int) -> nn.Linear:
    """The head of a LoRA reward model directory; an error (never a random head) when it is missing."""
    p = Path(path)
    if not (p / SCORE_HEAD_FILE).is_file():
        raise RewardModelError(
            f"reward model {p} has a LoRA adapter but no {SCORE_HEAD_FILE}, so it has no score head: it is "
            f"not a reward model (an SFT or PPO adapter?) or the file was not copied with it. Point reward_model "
            f"at the output_dir of an RM run (it holds {SCORE_HEAD_FILE}), or {TRAIN_HINT}."
        )
    weight = load_file(str(p / SCORE_HEAD_FILE))["weight"]
    if weight.shape != (1, hidden_size):
        raise RewardModelError(
            f"{p / SCORE_HEAD_FILE}: head shape {tuple(weight.shape)} does not fit hidden size {hidden_size}; "
            "the reward model was trained on a different base model"
        )
    head = nn.Linear(hidden_size, 1, bias=False)
    head.weight.data.copy_(weight)
    return head


def restore_reward_model(rm: RewardModel, ckpt: Path) -> None:
    """Load what ``save_reward_model`` wrote back into an already-built model, strictly (resume)."""
    if rm.is_lora:
        restore_model(rm.model, ckpt)
        rm.score.weight.data.copy_(load_score_head(ckpt, rm.score.in_features).weight)
        return
    state = read_weights(ckpt)
    rm.score.weight.data.copy_(state.pop("score.weight"))
    prefix = next(iter(state)).split(".", 1)[0] + "."
    rm.backbone.load_state_dict({k[len(prefix):]: v for k, v in state.items()}, strict=True)


def read_meta(path: str | Path) -> dict[str, Any]:
    """``reward_model.json`` (template, system prompt, base model), or ``{}`` for an RM from elsewhere."""
    p = Path(path) / META_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


def load_reward_model(
    path: str | Path,
    base_model: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
) -> tuple[RewardModel, Any, dict[str, Any]]:
    """``(reward model in eval mode, its tokenizer, reward_model.json)`` from either layout.

    LoRA: the base is ``base_model``, else the one recorded at training time. Full: any
    ``*ForSequenceClassification`` directory with ``num_labels=1`` (also one trained elsewhere).
    """
    p = check_model_dir(str(path), "reward_model")
    meta = read_meta(p)
    if (p / "adapter_config.json").is_file():
        base = base_model or meta.get("base_model") or json.loads((p / "adapter_config.json").read_text()).get(
            "base_model_name_or_path"
        )
        if not base:
            raise RewardModelError(f"reward model {p}: no base model recorded; pass the base model directory")
        lm = merge_adapters(load_causal_lm(base, dtype, trust_remote_code), list(meta.get("merged_adapters") or []))
        head = load_score_head(p, lm.config.get_text_config().hidden_size)
        rm = RewardModel(PeftModel.from_pretrained(lm, str(p)), head)
        tok_dir = p if (p / "tokenizer_config.json").is_file() else Path(base)
    else:
        rm = RewardModel(*_load_sequence_classifier(p, dtype, trust_remote_code))
        tok_dir = p
    rm.eval()
    if device is not None:
        rm.to(device)
    return rm, load_tokenizer(str(tok_dir), trust_remote_code), meta


def _load_sequence_classifier(p: Path, dtype: torch.dtype, trust_remote_code: bool) -> tuple[nn.Module, nn.Linear]:
    if not (p / "config.json").is_file():
        raise RewardModelError(
            f"reward model {p} has neither adapter_config.json (LoRA RM) nor config.json (full RM); {TRAIN_HINT}"
        )
    model, info = AutoModelForSequenceClassification.from_pretrained(
        p, num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True
    )
    if any(k.endswith("score.weight") for k in info["missing_keys"]):
        raise RewardModelError(
            f"reward model {p} has no score head (no score.weight in its weights; it looks like a plain "
            f"language model, e.g. an SFT output). Point reward_model at the output_dir of an RM run, or {TRAIN_HINT}."
        )
    return model.base_model, model.score
