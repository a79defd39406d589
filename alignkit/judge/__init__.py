"""A small judge server speaking the reward API shapes alignkit's client sends (dev, tests, demo)."""

from alignkit.judge.server import (
    FAULT_KINDS,
    PATHS,
    JudgeServer,
    JudgeSettings,
    add_judge_parser,
    create_app,
    judge_main,
    make_scorer,
    start_judge_server,
)

__all__ = [
    "FAULT_KINDS",
    "PATHS",
    "JudgeServer",
    "JudgeSettings",
    "add_judge_parser",
    "create_app",
    "judge_main",
    "make_scorer",
    "start_judge_server",
]
