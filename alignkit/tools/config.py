"""What the non-training commands (export, chat, predict, compare, pairs) share: the YAML loader
with ``key=value`` overrides, the ``alignkit NAME CONFIG.yaml`` parser, comma-list keys.

It sits under ``tools`` but imports nothing above ``alignkit.config``, so ``export`` can use it
without reaching up into the commands.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ValidationError

from alignkit.config import explain_validation_error, normalise_keys, read_raw

logger = logging.getLogger(__name__)


def load_tool_config(
    cls: type[BaseModel], path: str | Path | None, overrides: list[str] | None = None, **extra: Any
) -> Any:
    """A non-training config (export, predict, compare): YAML + ``key=value`` overrides + ``extra``,
    validated with the same unknown-key suggestions and error wording as the stage configs."""
    where = str(path) if path else "command line"
    raw = read_raw(path, overrides)
    # Command-line flags (``extra``) win over the file and its overrides here.
    raw.update({k: v for k, v in extra.items() if v is not None})
    for old, new in getattr(cls, "ALIASES", {}).items():
        if old in raw:
            raw[new] = raw.pop(old)
    ignored = getattr(cls, "IGNORED", {})
    for key in [k for k in raw if k in ignored]:
        logger.warning("%s: key %r has no effect here (%s); ignoring it", where, key, ignored[key])
        raw.pop(key)
    try:
        return cls(**normalise_keys(raw, cls, where))
    except ValidationError as err:
        raise explain_validation_error(err, where, cls) from None


def add_config_command(subparsers: argparse._SubParsersAction, name: str, help: str, cls: type[BaseModel],
                       func: Callable[[argparse.Namespace], int]) -> None:
    """``alignkit NAME CONFIG.yaml [key=value ...]``, its help listing ``cls``'s keys."""
    p = subparsers.add_parser(name, help=help, description=f"alignkit {name} CONFIG.yaml [key=value ...]\n"
                              f"Keys: {', '.join(cls.model_fields)}", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys")
    p.set_defaults(func=func)


def comma_list(v: Any) -> Any:
    """``"a, b"`` -> ``["a", "b"]`` (LLaMA-Factory writes lists as comma strings); other values unchanged."""
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    return v


# A list key that also accepts a comma string.
CommaList = Annotated[list[str], BeforeValidator(comma_list)]
