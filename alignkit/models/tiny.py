"""A tiny model of any family in ``architectures.TINY_ARCHS`` with a BPE tokenizer trained on shipped text.

Tests, benchmarks and the demo use it instead of a hub download: it is saved as an ordinary
Hugging Face directory and loaded back with its own Auto class (causal LM or image-text-to-text)
like a user's model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from alignkit.models.architectures import VL_ARCHS, VL_TOKENS, from_config, tiny_config

PAD, EOS, IM_START = "<|endoftext|>", "<|im_end|>", "<|im_start|>"
SPECIAL_TOKENS = [PAD, IM_START, EOS, "<think>", "</think>"]

# ChatML, as Qwen2 uses it; no default system prompt so tests see exactly what they pass.
# Bump when the build changes, so cached tiny models are rebuilt.
_VERSION = "3"  # 3: deepseek_v3 shaped like the real checkpoint (noaux_tc, MLA 512 + 64, untied)
# The tiny VL models' image processor (Qwen2-VL's, which Qwen3-VL uses): the vision tower's patch,
# merge and temporal sizes; min/max pixels small so image prompts cost a few tokens on CPU.
TINY_IMAGE_PROCESSOR = dict(patch_size=14, merge_size=2, temporal_patch_size=2,
                            size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112})

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def corpus_lines() -> list[str]:
    text = resources.files("alignkit").joinpath("assets/tiny_corpus.txt").read_text()
    return [line for line in text.splitlines() if line.strip()]


def build_tokenizer(vocab_size: int = 512, extra_text: list[str] | None = None,
                    extra_special: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the shipped corpus (plus ``extra_text``), ChatML chat template;
    ``extra_special`` tokens (a VL model's vision markers) follow the shared special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + list(extra_special or []),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines() + list(extra_text or []), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, bos_token=None, unk_token=None,
                                   chat_template=CHATML_TEMPLATE, model_max_length=2048, padding_side="left")


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
    pretrain_steps: int = 300,
) -> Path:
    """Build, save and return the path of a tiny model directory (config, weights, tokenizer).

    ``pretrain_steps`` of next-token training on the shipped corpus (a few seconds on CPU) make
    it a small but real language model that speaks ChatML, so LoRA fine-tuning and PPO on it
    behave like they do on a real base rather than on random weights.
    """
    out = Path(out_dir)
    settings = dict(arch=arch, hidden_size=hidden_size, intermediate_size=intermediate_size, num_layers=num_layers,
                    num_heads=num_heads, num_kv_heads=num_kv_heads, vocab_size=vocab_size,
                    tie_word_embeddings=tie_word_embeddings, seed=seed, pretrain_steps=pretrain_steps)
    if arch in VL_ARCHS:
        settings["image_processor"] = TINY_IMAGE_PROCESSOR  # part of the cache key: a change rebuilds
    cached = _cache_path(settings)
    if cached is not None and (cached / "config.json").is_file():
        shutil.copytree(cached, out, dirs_exist_ok=True)
        return out
    tokenizer = build_tokenizer(vocab_size, extra_special=VL_TOKENS if arch in VL_ARCHS else None)
    size = dict(settings, vocab_size=len(tokenizer))
    config = tiny_config(arch, size, token_ids(tokenizer, arch in VL_ARCHS))
    torch.manual_seed(seed)
    model = from_config(config)
    if pretrain_steps > 0:
        pretrain(model, tokenizer, pretrain_steps)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if arch in VL_ARCHS:
        save_image_processor(out)
    if cached is not None:
        _store(out, cached)
    return out


def save_image_processor(out: Path) -> None:
    """``preprocessor_config.json`` next to the weights, as a real Qwen-VL checkpoint has, so a user-like
    ``AutoImageProcessor.from_pretrained(model_dir)`` works; its patch and merge sizes match the tiny
    vision tower, and images are resized to 56-112 px a side, so an image is 4 to 16 tokens."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    Qwen2VLImageProcessorPil(**TINY_IMAGE_PROCESSOR).save_pretrained(out)


def token_ids(tokenizer, vision: bool) -> dict[str, int]:
    """pad/eos ids for the config; with ``vision``, the ids of Qwen-VL's image and video markers."""
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    if vision:
        start, end, image, video = tokenizer.convert_tokens_to_ids(VL_TOKENS)
        ids |= {"vision_start_token_id": start, "vision_end_token_id": end, "image_token_id": image,
                "video_token_id": video}
    return ids


def _cache_path(settings: dict) -> Path | None:
    """Where a built model with these settings is kept (the build is deterministic, so a
    cached copy is identical); ``ALIGNKIT_TINY_CACHE=off`` disables the cache."""
    root = os.environ.get("ALIGNKIT_TINY_CACHE", str(Path.home() / ".cache" / "alignkit" / "tiny"))
    if root == "off":
        return None
    corpus = resources.files("alignkit").joinpath("assets/tiny_corpus.txt").read_bytes()
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode() + corpus + _VERSION.encode()).hexdigest()[:16]
    return Path(root) / key


def _store(built: Path, cached: Path) -> None:
    """Copy into the cache through a temporary directory and an atomic rename."""
    tmp = None
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cached.parent))
        shutil.copytree(built, tmp, dirs_exist_ok=True)
        tmp.rename(cached)
    except OSError:  # another process stored it first, or the cache is not writable
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def pretraining_text() -> list[str]:
    """Corpus lines; question lines ("Q? A.") also as ChatML turns so the model learns the format."""
    texts = []
    for line in corpus_lines():
        texts.append(line + EOS)
        if "? " in line:
            q, a = line.split("? ", 1)
            texts.append(f"{IM_START}user\n{q}?{EOS}\n{IM_START}assistant\n{a}{EOS}\n")
    return texts


def pretrain(model, tokenizer, steps: int, seq_len: int = 64, batch_size: int = 16, lr: float = 3e-3) -> None:
    """Plain causal-LM training on the packed corpus; deterministic given the global seed."""
    ids = [t for text in pretraining_text() for t in tokenizer(text)["input_ids"]]
    data = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)  # (N, L)
    # One intra-op thread: for a model this small, OpenMP threads cost more than they give, and
    # on a busy 2-core machine two spinning threads were 10x slower per step than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _pretrain_loop(model, data, steps, batch_size, lr)
    finally:
        torch.set_num_threads(threads)


def _pretrain_loop(model, data: torch.Tensor, steps: int, batch_size: int, lr: float) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    model.train()
    for _ in range(steps):
        batch = data[torch.randint(len(data), (batch_size,))]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
