"""Images in prompts: ``<image>`` placeholders to a Qwen-VL model's image tokens, and pixel tensors.

LLaMA-Factory's qwen2_vl/qwen3_vl plugin and ``Qwen3VLProcessor`` both turn each image of a text,
in order, into ``<|vision_start|>`` + n x ``<|image_pad|>`` + ``<|vision_end|>``, where n is the
image's patch grid (``image_grid_thw``) over ``merge_size**2``; the model's forward then puts the
vision tower's n embeddings in place of the n pad tokens. alignkit does exactly that with the
checkpoint's own image processor (``AutoImageProcessor``: resizing, patches, grid). It does not
build ``Qwen3VLProcessor`` itself: in transformers 5 that class insists on a video processor,
which needs torchvision, and alignkit takes no videos.

Pixel tensors are made when a batch is built, not kept for the whole dataset: a real image is
megabytes of patches.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignkit.data.loader import IMAGE_PLACEHOLDER, DataError, Example


@dataclass(frozen=True)
class VisionProcessor:
    """A Qwen-VL checkpoint's image processor and its vision marker tokens."""

    image_processor: Any
    start: str  # <|vision_start|>
    pad: str  # <|image_pad|>: one per merged patch
    end: str  # <|vision_end|>
    image_token_id: int
    max_pixels: int = 768 * 768  # image_max_pixels
    min_pixels: int = 32 * 32  # image_min_pixels

    @classmethod
    def load(cls, model_dir: str | Path, tokenizer: Any, max_pixels: int = 768 * 768,
             min_pixels: int = 32 * 32) -> VisionProcessor | None:
        """The processor of a Qwen-VL style checkpoint (config names ``vision_start_token_id`` and
        ``image_token_id``); ``None`` for a model that takes no images."""
        config = json.loads((Path(model_dir) / "config.json").read_text())
        if "vision_start_token_id" not in config or "image_token_id" not in config:
            return None
        from transformers import AutoImageProcessor

        try:
            image_processor = AutoImageProcessor.from_pretrained(model_dir)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(
                f"{model_dir}: a vision-language checkpoint without a usable image processor "
                f"(preprocessor_config.json: {e}); copy preprocessor_config.json from the base model "
                "into this directory."
            ) from None
        start, end, pad = tokenizer.convert_ids_to_tokens(
            [config["vision_start_token_id"], config["vision_end_token_id"], config["image_token_id"]])
        return cls(image_processor, start, pad, end, config["image_token_id"], max_pixels, min_pixels)

    def encode(self, paths: Sequence[str]) -> dict[str, torch.Tensor]:
        """``pixel_values`` (patches of all images, flattened: (N, C*T*P*P)) and ``image_grid_thw`` (n, 3)."""
        from PIL import Image

        images = []
        for path in paths:
            with Image.open(path) as im:
                images.append(fit_pixels(im.convert("RGB"), self.max_pixels, self.min_pixels))
        out = self.image_processor(images=images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def num_tokens(self, grid_thw: torch.Tensor) -> list[int]:
        """Image tokens per image: its patches after the vision tower merges ``merge_size**2`` of them."""
        merge = self.image_processor.merge_size ** 2
        return [int(g.prod()) // merge for g in grid_thw]

    def expand(self, example: Example) -> list[dict]:
        """``example.messages`` with each ``<image>`` replaced by that image's vision tokens."""
        counts = iter(self.num_tokens(self.encode(example.images)["image_grid_thw"]) if example.images else [])
        out = []
        for m in example.messages:
            parts = m["content"].split(IMAGE_PLACEHOLDER)
            content = parts[0]
            for part in parts[1:]:
                content += self.start + self.pad * next(counts) + self.end + part
            out.append({**m, "content": content})
        return out

    def mm_token_type_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """1 on image tokens, 0 elsewhere: what transformers reads to lay out Qwen-VL's 3-D rope positions."""
        return (input_ids == self.image_token_id).int()


def fit_pixels(image: Any, max_pixels: int, min_pixels: int) -> Any:
    """The image scaled into [min_pixels, max_pixels] (aspect kept, sides truncated to whole
    pixels), then kept at least 28 px a side and under a 200:1 aspect: LLaMA-Factory's image
    pre-processing for its Qwen-VL plugins (mm_plugin.py), so the same image gives the same tokens."""
    for bound, outside in ((max_pixels, lambda n: n > max_pixels), (min_pixels, lambda n: n < min_pixels)):
        if outside(image.width * image.height):
            factor = math.sqrt(bound / (image.width * image.height))
            image = image.resize((int(image.width * factor), int(image.height * factor)))
    if min(image.width, image.height) < 28:
        image = image.resize((max(image.width, 28), max(image.height, 28)))
    if image.width / image.height > 200:
        image = image.resize((image.height * 180, image.height))
    if image.height / image.width > 200:
        image = image.resize((image.width, image.width * 180))
    return image


def prompt_messages(example: Example, vision: VisionProcessor | None) -> list[dict]:
    """The messages to template: placeholders expanded for a VL model, as they are for a text row.

    Images given to a model without vision is an error naming the row, not a silent text-only run.
    """
    if not example.images:
        return example.messages
    if vision is None:
        raise DataError(
            f"{example.source}: this row has {len(example.images)} image(s), but the model takes no images "
            "(its config.json has no vision tokens). Train a vision-language model (Qwen3-VL, Qwen3-VL-MoE) "
            "on image data, or drop the 'images' column from the dataset's entry in dataset_info.json."
        )
    return vision.expand(example)


def check_image_tokens(example: Example, vision: VisionProcessor | None, ids: Sequence[int], expected: int) -> None:
    """Cutting to ``cutoff_len`` must keep every image token: a part of an image cannot be fed."""
    if vision is None or not example.images:
        return
    kept = sum(1 for t in ids if t == vision.image_token_id)
    if kept != expected:
        raise DataError(
            f"{example.source}: cutoff_len cuts through this row's images ({kept} of {expected} image tokens "
            "kept); raise cutoff_len or lower image_max_pixels."
        )


@dataclass(frozen=True)
class PixelRows:
    """Each row's pixel inputs, ``None`` for a text-only row; the samples of one prompt share its tensors.

    Qwen-VL takes the patches of every image in a batch flattened into one tensor, in the order
    of their tokens in the (B, T) ids, so a batch of rows concatenates its rows' tensors in row order.
    """

    pixel_values: list[torch.Tensor | None]  # per row: (N_i, D)
    image_grid_thw: list[torch.Tensor | None]  # per row: (n_i, 3)

    @classmethod
    def build(cls, vision: VisionProcessor, images: Sequence[Sequence[str]], device: Any = None) -> PixelRows:
        """Encode each distinct image list once (a prompt's group repeats it)."""
        done: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}
        for paths in images:
            key = tuple(paths)
            if key and key not in done:
                done[key] = {k: v.to(device) for k, v in vision.encode(paths).items()}
        rows = [done.get(tuple(p)) for p in images]
        return cls([r and r["pixel_values"] for r in rows], [r and r["image_grid_thw"] for r in rows])

    def select(self, rows: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The forward kwargs of these rows (in this order); ``None`` when none has an image."""
        rows = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
        picked = [r for r in rows if self.pixel_values[r] is not None]
        if not picked:
            return None
        return {"pixel_values": torch.cat([self.pixel_values[r] for r in picked]),
                "image_grid_thw": torch.cat([self.image_grid_thw[r] for r in picked])}

    def slice(self, start: int, stop: int) -> PixelRows:
        return PixelRows(self.pixel_values[start:stop], self.image_grid_thw[start:stop])


def batch_images(vision: VisionProcessor | None, images: Sequence[Sequence[str]],
                 input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """A collator's pixel inputs for (B, T) ``input_ids``: pixels, grids and ``mm_token_type_ids``;
    empty when no row has an image (the batch stays text-only)."""
    if vision is None or not any(images):
        return {}
    pixels = PixelRows.build(vision, images).select(range(len(images)))
    return {**pixels, "mm_token_type_ids": vision.mm_token_type_ids(input_ids)}
