"""``alignkit chat`` and ``alignkit predict``: generate from a model dir, an adapter stack or a run dir.

A run dir (an SFT/PPO ``output_dir``) brings its base, its adapters in order and its template
and system prompt (``alignkit.export.resolve_run``), so a model is prompted as it was trained.
``alignkit compare`` lives in ``alignkit.compare``; its parser is registered here.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from tqdm.auto import tqdm
from transformers import GenerationConfig, TextIteratorStreamer

from alignkit.data.collators import pad_left
from alignkit.data.encode import encode_prompt
from alignkit.data.loader import Example, load_examples
from alignkit.data.templates import get_template
from alignkit.export import DTYPES, ModelSpec, _comma_list, build_spec, load_merged, load_tool_config
from alignkit.models.loading import load_tokenizer
from alignkit.generation import first_eos_mask, stop_token_ids

logger = logging.getLogger(__name__)

# LLaMA-Factory predict configs carry these; they mean nothing to `alignkit predict`.
LF_PREDICT_IGNORED = {
    "stage": "predict always generates",
    "do_predict": "predict always generates",
    "predict_with_generate": "predict always generates",
    "finetuning_type": "whatever adapter_name_or_path lists is applied",
    "overwrite_output_dir": "the output file is overwritten",
}


# ---------------------------------------------------------------- loading and generation


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
        self.template = get_template(spec.template, self.tokenizer)
        self.eos_ids = stop_token_ids(self.tokenizer, self.template, self.model)

    def prompt_ids(self, example: Example, cutoff_len: int) -> list[int]:
        return encode_prompt(self.tokenizer, self.template, example, cutoff_len, self.spec.default_system,
                             self.spec.enable_thinking)

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
    dataset: list[str] = Field(description="Dataset names from dataset_info.json, or .json/.jsonl paths (comma list).")
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

    @field_validator("dataset", mode="before")
    @classmethod
    def _lists(cls, v: Any) -> Any:
        return _comma_list(v)


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


# ---------------------------------------------------------------- predict


class PredictConfig(GenerationKeys):
    """``alignkit predict`` keys."""

    IGNORED: ClassVar[dict[str, str]] = LF_PREDICT_IGNORED

    model_name_or_path: str = Field(description="Base model directory, or an SFT/PPO run dir.")
    adapter_name_or_path: list[str] | None = Field(None, description="Adapters applied (merged) in order.")
    output_file: str | None = Field(None, description="JSONL written with one row per prompt.")
    output_dir: str | None = Field(None, description="If output_file is unset: output_dir/generated_predictions.jsonl.")

    @field_validator("adapter_name_or_path", mode="before")
    @classmethod
    def _adapters(cls, v: Any) -> Any:
        return _comma_list(v)

    @model_validator(mode="after")
    def _output(self) -> PredictConfig:
        if self.output_file is None:
            if self.output_dir is None:
                raise ValueError("key 'output_file' is required (or output_dir)")
            self.output_file = str(Path(self.output_dir) / "generated_predictions.jsonl")
        return self


def run_predict(cfg: PredictConfig) -> dict[str, Any]:
    """Generate for every prompt of the dataset; write JSONL; return the summary numbers."""
    spec = build_spec(cfg.model_name_or_path, cfg.adapter_name_or_path, cfg.template, cfg.default_system,
                      cfg.enable_thinking)
    examples = load_examples(cfg.dataset, cfg.dataset_dir, "prompt", cfg.max_samples)
    gen = Generator(spec, cfg.infer_dtype, cfg.device, cfg.trust_remote_code)
    t0 = time.perf_counter()
    rows = generate_all(gen, cfg, examples, "predict")
    seconds = time.perf_counter() - t0
    out = Path(cfg.output_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tokens = sum(r["tokens"] for r in rows)
    return {"output_file": str(out), "samples": len(rows), "tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else None}


def cmd_predict(args: argparse.Namespace) -> int:
    cfg = load_tool_config(PredictConfig, args.config, args.overrides)
    s = run_predict(cfg)
    print(f"wrote {s['samples']} predictions to {s['output_file']}: {s['tokens']} new tokens in "
          f"{s['seconds']:.2f} s ({s['tokens_per_s']} tokens/s)")
    return 0


# ---------------------------------------------------------------- chat


HELP = "commands: /reset clears the history, /exit quits"


def chat(gen: Generator, stdin: IO[str], stdout: IO[str], max_new_tokens: int = 512, temperature: float = 0.0,
         top_p: float = 1.0, cutoff_len: int = 4096) -> list[str]:
    """An interactive loop over ``stdin`` lines, streaming each answer to ``stdout`` token by token.

    Returns the responses in order (tests feed a script of lines and check them).
    """
    gen_cfg = gen.generation_config(max_new_tokens, temperature, top_p)
    history: list[dict[str, str]] = []
    responses: list[str] = []
    stdout.write(f"alignkit chat — template {gen.spec.template}; {HELP}\n")
    while True:
        stdout.write("\nUser: ")
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            break
        text = line.strip()
        if text == "/reset":
            history.clear()
            stdout.write("(history cleared)\n")
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        ids = gen.prompt_ids(Example(messages=list(history)), cutoff_len)
        stdout.write("Assistant: ")
        response = stream_response(gen, ids, gen_cfg, stdout)
        history.append({"role": "assistant", "content": response})
        responses.append(response)
    stdout.write("\nbye\n")
    return responses


def stream_response(gen: Generator, ids: list[int], gen_cfg: GenerationConfig, stdout: IO[str]) -> str:
    """``generate`` on a thread, text pieces written as they arrive (transformers' streamer)."""
    streamer = TextIteratorStreamer(gen.tokenizer, skip_prompt=True, skip_special_tokens=True)
    failure: list[BaseException] = []

    def work() -> None:
        try:
            with torch.no_grad():
                gen.model.generate(input_ids=torch.tensor([ids], device=gen.device),
                                   attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=gen.device),
                                   generation_config=gen_cfg, streamer=streamer)
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread below
            failure.append(e)
            streamer.end()  # unblock the reader

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    pieces = []
    for piece in streamer:
        stdout.write(piece)
        stdout.flush()
        pieces.append(piece)
    thread.join()
    if failure:
        raise failure[0]
    stdout.write("\n")
    return "".join(pieces).strip()


def cmd_chat(args: argparse.Namespace) -> int:
    spec = build_spec(args.model, args.adapter, args.template, args.system, args.enable_thinking)
    gen = Generator(spec, args.infer_dtype, args.device, args.trust_remote_code)
    chat(gen, sys.stdin, sys.stdout, args.max_new_tokens, args.temperature, args.top_p)
    return 0


# ---------------------------------------------------------------- CLI


def _yes_no(v: str) -> bool:
    if v.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError("expected true or false")
    return v.lower() == "true"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    c = subparsers.add_parser("chat", help="chat in the terminal with a model, adapters or a run dir (streamed)",
                              description=f"Interactive chat; {HELP}.")
    c.add_argument("--model", required=True, help="base model dir, or an SFT/PPO run dir (brings its adapters)")
    c.add_argument("--adapter", action="append", help="adapter dir, applied in order (repeat for SFT then PPO)")
    c.add_argument("--template", help="chat template (default: the run's, else the tokenizer's own)")
    c.add_argument("--system", help="system prompt (default: the run's default_system / the template's)")
    c.add_argument("--enable_thinking", type=_yes_no, default=None, help="true/false for Qwen3-style templates")
    c.add_argument("--max_new_tokens", type=int, default=512)
    c.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    c.add_argument("--top_p", type=float, default=1.0)
    c.add_argument("--infer_dtype", default="auto", choices=["auto", *DTYPES])
    c.add_argument("--device", default="auto")
    c.add_argument("--trust_remote_code", action="store_true")
    c.set_defaults(func=cmd_chat)

    for name, func, cls, what in [
        ("predict", cmd_predict, PredictConfig, "batch generation over a dataset to JSONL"),
        ("compare", _cmd_compare, None, "generate with two models on the same prompts and score both"),
    ]:
        keys = ", ".join((cls or _compare_config()).model_fields)
        p = subparsers.add_parser(name, help=what, description=f"alignkit {name} CONFIG.yaml [key=value ...]\n"
                                  f"Keys: {keys}", formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("config", help="YAML config file")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys")
        p.set_defaults(func=func)


def _compare_config() -> type[BaseModel]:
    from alignkit.compare import CompareConfig

    return CompareConfig


def _cmd_compare(args: argparse.Namespace) -> int:
    from alignkit.compare import cmd_compare

    return cmd_compare(args)

