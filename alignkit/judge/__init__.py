"""A small judge server speaking the reward API shapes alignkit's client sends (dev, tests, demo).

Names are imported from ``alignkit.judge.server`` on first use, so that
``python -m alignkit.judge.server`` does not import the module twice.
"""

from __future__ import annotations

from typing import Any

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


def __getattr__(name: str) -> Any:
    if name in __all__:
        from alignkit.judge import server

        return getattr(server, name)
    raise AttributeError(f"module 'alignkit.judge' has no attribute {name!r}")
