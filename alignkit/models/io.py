"""Model weights on disk: save a model, read a directory's safetensors weights, restore strictly.

Two layouts, as ``save_model`` writes them: a peft adapter (``adapter_model.safetensors``) or a
plain Hugging Face model directory (``model.safetensors``, or shards listed in
``model.safetensors.index.json`` once a model outgrows one file).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
ADAPTER_FILE = "adapter_model.safetensors"


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory, from one safetensors file or all the shards of its index."""
    index = path / WEIGHTS_INDEX
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [WEIGHTS_FILE]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(path / f)))
    return state


def save_model(model: torch.nn.Module, out: Path, tokenizer=None) -> None:
    """LoRA: the adapter (peft format). Full: a plain HF model directory (safetensors)."""
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def restore_model(model: torch.nn.Module, ckpt: Path) -> None:
    """Load the weights ``save_model`` wrote back into an already-built model, strictly (resume)."""
    if isinstance(model, PeftModel):
        result = set_peft_model_state_dict(model, load_file(str(ckpt / ADAPTER_FILE)))
        if result.unexpected_keys:
            raise RuntimeError(f"checkpoint {ckpt} has adapter keys this model lacks: {result.unexpected_keys[:5]}")
        return
    missing, unexpected = model.load_state_dict(read_weights(ckpt), strict=False)
    # save_pretrained leaves out tied weights (the LM head shares the embedding), so they are
    # "missing" from the file but restored through the tie.
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {ckpt}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
