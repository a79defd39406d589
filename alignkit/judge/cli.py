"""``alignkit judge serve``: registers the judge server's command with the main CLI."""

from __future__ import annotations


def add_parser(sub) -> None:
    from alignkit.judge.server import add_judge_parser, judge_main

    add_judge_parser(sub).set_defaults(func=lambda args: judge_main(args) or 0)
