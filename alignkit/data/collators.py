"""Batching: left padding for generation, right padding for training sequences.

With a ``VisionProcessor`` (a VL model), features that carry ``images`` (paths) get their pixel
tensors here, batch by batch: ``pixel_values``, ``image_grid_thw`` and ``mm_token_type_ids``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from alignkit.data.encode import IGNORE_INDEX
from alignkit.data.vision import VisionProcessor, batch_images


def _as_list(seq: Any) -> list[int]:
    return seq.tolist() if isinstance(seq, torch.Tensor) else list(seq)


def _pad(seqs: Sequence[Sequence[int]], value: int, length: int, left: bool) -> torch.Tensor:
    out = torch.full((len(seqs), length), value, dtype=torch.long)  # (B, T)
    for i, seq in enumerate(seqs):
        seq = _as_list(seq)
        if seq:
            if left:
                out[i, length - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            else:
                out[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


def _pad_right(seqs: Sequence[Sequence[int]], pad_id: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    ones = [[1] * len(_as_list(s)) for s in seqs]
    return _pad(seqs, pad_id, length, left=False), _pad(ones, 0, length, left=False)


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Left-pad prompts so every row's last token is at the same position, as generation
    expects. Returns ``input_ids`` and ``attention_mask``, both (B, T)."""
    length = max((len(_as_list(s)) for s in seqs), default=0)
    ones = [[1] * len(_as_list(s)) for s in seqs]
    return _pad(seqs, pad_id, length, left=True), _pad(ones, 0, length, left=True)


@dataclass
class SFTCollator:
    """Right-pads ``input_ids`` (with ``pad_id``) and ``labels`` (with -100)."""

    pad_id: int
    vision: VisionProcessor | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(_as_list(f["input_ids"])) for f in features)
        input_ids, attention_mask = _pad_right([f["input_ids"] for f in features], self.pad_id, length)
        labels = _pad([f["labels"] for f in features], IGNORE_INDEX, length, left=False)
        images = batch_images(self.vision, [f.get("images") or [] for f in features], input_ids)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, **images}  # (B, T)


@dataclass
class PairCollator:
    """Right-pads chosen and rejected sequences to ONE common length, so a trainer can
    ``torch.cat`` them into a single (2B, T) forward pass. Features carry ``chosen_ids``,
    ``rejected_ids`` and optionally ``margin``; a ``margin`` tensor (B,) is returned when
    any feature has one (missing margins are 0). With images, ``pixels`` holds the kwargs of the
    (2B, T) forward: each pair's images twice, chosen rows first, as the ids are concatenated."""

    pad_id: int
    vision: VisionProcessor | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        chosen = [f["chosen_ids"] for f in features]
        rejected = [f["rejected_ids"] for f in features]
        length = max(len(_as_list(s)) for s in chosen + rejected)
        batch = {}
        for name, seqs in (("chosen", chosen), ("rejected", rejected)):
            batch[f"{name}_input_ids"], batch[f"{name}_attention_mask"] = _pad_right(
                seqs, self.pad_id, length
            )
        if any(f.get("margin") is not None for f in features):
            batch["margin"] = torch.tensor([float(f.get("margin") or 0.0) for f in features])
        images = [f.get("images") or [] for f in features] * 2
        both = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        batch.update(batch_images(self.vision, images, both))
        return batch
