"""What ``alignkit predict``, ``chat`` and ``compare`` share: a merged model ready to generate
(``Generator``), the generation keys of their configs (``GenerationKeys``), and batched
generation over a dataset (``generate_all``).

Inference uses transformers' ``generate`` (greedy decoding, streaming for chat); stop tokens
and the cut after the first EOS come from ``alignkit.generation``, as in PPO rollouts.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm
from transformers import GenerationConfig

from alignkit.data.chat_format import ChatFormat
from alignkit.data.collators import pad_left
from alignkit.data.encode import encode_prompt
from alignkit.data.loader import Example
from alignkit.export import DTYPES, load_merged
from alignkit.generation import first_eos_mask, stop_token_ids
from alignkit.models.loading import load_tokenizer
from alignkit.runs import ModelSpec
from alignkit.tools.config import CommaList


class Generator:
    """A merged model, its tokenizer, template and stop tokens, ready to generate."""

    def __init__(self, spec: ModelSpec, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False):
        self.spec = spec
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        if dtype == "auto":
            bf16 = self.device.startswith("cuda") and torch.cuda.is_bf16_supported()
            torch_dtype = torch.bfloat16 if bf16 else torch.float32
        else:
            torch_dtype = DTYPES[dtype]
        self.tokenizer = load_tokenizer(spec.tokenizer_dir, trust_remote_code)
        self.model = load_merged(spec, torch_dtype, trust_remote_code).to(self.device)
        self.format = ChatFormat.of(spec, self.tokenizer)
        self.eos_ids = stop_token_ids(self.tokenizer, self.format.template, self.model)

    def prompt_ids(self, example: Example, cutoff_len: int) -> list[int]:
        return encode_prompt(self.format, example, cutoff_len)

    def generation_config(self, max_new_tokens: int, temperature: float, top_p: float = 1.0,
                          top_k: int = 0) -> GenerationConfig:
        """Explicit settings: the model's own generation_config (repetition penalty, sampling
        defaults) would make predict/compare differ from what the config file says."""
        sample = temperature > 0
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=top_p if sample else None,
            top_k=(top_k or None) if sample else None,
            eos_token_id=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id,
        )

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], gen_cfg: GenerationConfig) -> tuple[list[str], list[int]]:
        """Responses (cut after the first stop token, special tokens removed) and their token counts."""
        ids, mask = pad_left(prompts, self.tokenizer.pad_token_id)  # (B, Q)
        out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                  generation_config=gen_cfg)
        response = out[:, ids.shape[1]:].cpu()  # (B, R)
        keep, _ = first_eos_mask(response, self.eos_ids)
        texts = [self.tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True).strip()
                 for row, m in zip(response, keep, strict=True)]
        return texts, keep.sum(-1).tolist()


class GenerationKeys(BaseModel):
    """Keys shared by predict and compare (LLaMA-Factory's names)."""

    model_config = ConfigDict(extra="forbid")
    ALIASES: ClassVar[dict[str, str]] = {"per_device_eval_batch_size": "batch_size", "eval_dataset": "dataset"}

    template: str | None = Field(None, description="Chat template (default: the run's, else the tokenizer's own).")
    default_system: str | None = Field(None, description="Replaces the template's default system prompt.")
    enable_thinking: bool | None = Field(None, description="Qwen3-style templates: false renders with thinking off.")
    trust_remote_code: bool = Field(False, description="Allow custom model code from the model directory.")
    dataset: CommaList = Field(description="Dataset names from dataset_info.json, or .json/.jsonl paths (comma list).")
    dataset_dir: str = Field("data", description="Directory holding dataset_info.json and the data files.")
    max_samples: int | None = Field(None, ge=1, description="Use at most this many rows per dataset.")
    cutoff_len: int = Field(1024, ge=8, description="Longest prompt in tokens (longer prompts keep their end).")
    max_new_tokens: int = Field(256, ge=1, description="Response length limit in tokens.")
    temperature: float = Field(0.0, ge=0.0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling (with temperature > 0).")
    top_k: int = Field(0, ge=0, description="Top-k sampling (0 = off; with temperature > 0).")
    batch_size: int = Field(8, ge=1, description="Prompts per generate call.")
    seed: int = Field(42, description="Seed set before generating (sampling is reproducible).")
    infer_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on a GPU that supports it, else float32."
    )
    device: str = Field("auto", description="auto (cuda if available), cpu, cuda, cuda:1, ...")


def generate_all(gen: Generator, cfg: GenerationKeys, examples: list[Example], desc: str) -> list[dict[str, Any]]:
    """One row per example: prompt (as the model saw it), response, label, tokens, latency_s.

    ``latency_s`` is the wall time of the batch the example was generated in.
    """
    torch.manual_seed(cfg.seed)
    gen_cfg = gen.generation_config(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k)
    rows: list[dict[str, Any]] = []
    for start in tqdm(range(0, len(examples), cfg.batch_size), desc=desc, unit="batch"):
        batch = examples[start : start + cfg.batch_size]
        prompts = [gen.prompt_ids(ex, cfg.cutoff_len) for ex in batch]
        t0 = time.perf_counter()
        texts, tokens = gen.generate(prompts, gen_cfg)
        latency = time.perf_counter() - t0
        for ex, ids, text, n in zip(batch, prompts, texts, tokens, strict=True):
            rows.append({"prompt": gen.tokenizer.decode(ids), "response": text, "label": ex.label,
                         "tokens": n, "latency_s": round(latency, 4)})
    return rows
