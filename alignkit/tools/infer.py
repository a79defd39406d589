"""``alignkit chat`` and ``alignkit predict``: generate from a model dir, an adapter stack or a run dir.

A run dir (an SFT/PPO ``output_dir``) brings its base, its adapters in order and its template
and system prompt (``alignkit.runs.resolve_run``), so a model is prompted as it was trained.
The model and batched generation are ``alignkit.tools.generator``'s, shared with ``alignkit compare``.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, ClassVar

import torch
from pydantic import Field, model_validator
from transformers import GenerationConfig, TextIteratorStreamer

from alignkit.data.loader import Example, load_examples
from alignkit.export import DTYPES
from alignkit.runs import build_spec
from alignkit.tools.config import CommaList, add_config_command, load_tool_config
from alignkit.tools.generator import GenerationKeys, Generator, generate_all

# LLaMA-Factory predict configs carry these; they mean nothing to `alignkit predict`.
LF_PREDICT_IGNORED = {
    "stage": "predict always generates",
    "do_predict": "predict always generates",
    "predict_with_generate": "predict always generates",
    "finetuning_type": "whatever adapter_name_or_path lists is applied",
    "overwrite_output_dir": "the output file is overwritten",
}


# ---------------------------------------------------------------- predict


class PredictConfig(GenerationKeys):
    """``alignkit predict`` keys."""

    IGNORED: ClassVar[dict[str, str]] = LF_PREDICT_IGNORED

    model_name_or_path: str = Field(description="Base model directory, or an SFT/PPO run dir.")
    adapter_name_or_path: CommaList | None = Field(None, description="Adapters applied (merged) in order.")
    output_file: str | None = Field(None, description="JSONL written with one row per prompt.")
    output_dir: str | None = Field(None, description="If output_file is unset: output_dir/generated_predictions.jsonl.")

    @model_validator(mode="after")
    def _output(self) -> PredictConfig:
        if self.output_file is None:
            if self.output_dir is None:
                raise ValueError("key 'output_file' is required (or output_dir)")
            self.output_file = str(Path(self.output_dir) / "generated_predictions.jsonl")
        if Path(self.output_file).is_dir():
            raise ValueError(f"key 'output_file': {self.output_file} is a directory; give a .jsonl file path")
        return self


def run_predict(cfg: PredictConfig) -> dict[str, Any]:
    """Generate for every prompt of the dataset; write JSONL; return the summary numbers."""
    # Paths, the dataset and the output directory are checked before the model loads.
    spec = build_spec(cfg.model_name_or_path, cfg.adapter_name_or_path, cfg.template, cfg.default_system,
                      cfg.enable_thinking)
    examples = load_examples(cfg.dataset, cfg.dataset_dir, "prompt", cfg.max_samples)
    out = Path(cfg.output_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    gen = Generator(spec, cfg.infer_dtype, cfg.device, cfg.trust_remote_code)
    t0 = time.perf_counter()
    rows = generate_all(gen, cfg, examples, "predict")
    seconds = time.perf_counter() - t0
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

    add_config_command(subparsers, "predict", "batch generation over a dataset to JSONL", PredictConfig, cmd_predict)
