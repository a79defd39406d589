"""``alignkit tiny OUT_DIR [--arch NAME]``: write a tiny model of one family to disk, for trying alignkit
(or a new architecture) in seconds."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    from alignkit.models.architectures import TINY_ARCHS

    p = sub.add_parser("tiny", help="build a tiny test model (any supported family) and tokenizer into a directory")
    p.add_argument("out_dir", help="directory to write (a normal Hugging Face model directory)")
    p.add_argument("--arch", choices=list(TINY_ARCHS), default="qwen2",
                   help="model family (docs/models.md): dense, MoE and vision-language")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--pretrain-steps", type=int, default=300, help="next-token steps on the shipped corpus (0: random)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from alignkit.models.tiny import build_tiny

    path = build_tiny(args.out_dir, arch=args.arch, hidden_size=args.hidden_size,
                      intermediate_size=2 * args.hidden_size, num_layers=args.layers,
                      pretrain_steps=args.pretrain_steps)
    print(f"tiny {args.arch} model written to {path}")
    return 0
