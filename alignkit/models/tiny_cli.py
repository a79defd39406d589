"""``alignkit tiny OUT_DIR``: write the tiny test model to disk, for trying alignkit in seconds."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("tiny", help="build the tiny Qwen2/Llama test model and tokenizer into a directory")
    p.add_argument("out_dir", help="directory to write (a normal Hugging Face model directory)")
    p.add_argument("--arch", choices=["qwen2", "llama"], default="qwen2")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from alignkit.models.tiny import build_tiny

    path = build_tiny(args.out_dir, arch=args.arch, hidden_size=args.hidden_size,
                      intermediate_size=2 * args.hidden_size, num_layers=args.layers)
    print(f"tiny model written to {path}")
    return 0
