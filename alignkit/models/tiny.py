"""A tiny Qwen2- or Llama-architecture model with a BPE tokenizer trained on shipped text.

Tests, benchmarks and the demo use it instead of a hub download: it is saved as an ordinary
Hugging Face directory and loaded back with ``AutoModelForCausalLM`` like a user's model.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

PAD, EOS, IM_START = "<|endoftext|>", "<|im_end|>", "<|im_start|>"
SPECIAL_TOKENS = [PAD, IM_START, EOS, "<think>", "</think>"]

# ChatML, as Qwen2 uses it; no default system prompt so tests see exactly what they pass.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def corpus_lines() -> list[str]:
    text = resources.files("alignkit").joinpath("assets/tiny_corpus.txt").read_text()
    return [line for line in text.splitlines() if line.strip()]


def build_tokenizer(vocab_size: int = 512, extra_text: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the shipped corpus (plus ``extra_text``), ChatML chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines() + list(extra_text or []), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=None,
        unk_token=None,
        chat_template=CHATML_TEMPLATE,
        model_max_length=2048,
        padding_side="left",
    )


def build_tiny(
    out_dir: str | Path,
    arch: str = "qwen2",
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 512,
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> Path:
    """Build, save and return the path of a tiny model directory (config, weights, tokenizer)."""
    out = Path(out_dir)
    tokenizer = build_tokenizer(vocab_size)
    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}.get(arch)
    if cls is None:
        raise ValueError(f"tiny arch must be 'qwen2' or 'llama', got {arch!r}")
    config = cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
