"""What every request shape builds on: an item, a reply that cannot be used, the ``Preset`` interface,
and the helpers that fill a sample into a template (``presets.py`` has the shapes themselves)."""

from __future__ import annotations

import base64
import mimetypes
import re
from pathlib import Path
from typing import Any

# (prompt, response, label), or (prompt, response, label, images: tuple of paths[, row rubric: JSON text or None])
Item = tuple

_PLACEHOLDER = re.compile(r"\{(prompt|response|label)\}")


# What every rubric shows the judge: the prompt, the response and the reference answer (``fill``'s fields).
JUDGE_INPUTS = """[Prompt]
{prompt}

[Response]
{response}

[Reference answer]
{label}"""


class ReplyError(Exception):
    """The reply as a whole is unusable; every item of the request fails with this reason."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


def fill(template: str, item: Item) -> str:
    """Replace ``{prompt}``, ``{response}``, ``{label}`` in one pass (user text is never re-scanned)."""
    prompt, response, label = item[:3]
    values = {"prompt": prompt, "response": response, "label": "" if label is None else label}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def images_of(item: Item) -> list[str]:
    """The item's image paths (none for a text prompt)."""
    return list(item[3]) if len(item) > 3 else []


def data_url(path: str) -> str:
    """An image file as a ``data:`` URL (``image_url`` content parts of the OpenAI chat API)."""
    mime = mimetypes.guess_type(path)[0] or "image/png"
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def kind_of(x: Any) -> str:
    if isinstance(x, dict):
        return "an object with keys " + ", ".join(map(repr, list(x)[:8]))
    return f"a {type(x).__name__}"


class Preset:
    """Build a body for a batch and read the raw values (and OpenRLHF ``extra_logs``) back.

    A ``full_text`` preset is given, where the trainer has them, the templated prompt (chat
    markers, system prompt) and the response with its special tokens, as the tool it imitates
    sends them; elsewhere (``alignkit score``, compare) the plain prompt and response."""

    full_text = False

    def __init__(self, name: str, max_batch: int | None = None):
        self.name = name
        self.max_batch = max_batch  # items per request the shape allows (None: any)

    def build(self, items: list[Item]) -> dict[str, Any]:
        raise NotImplementedError

    def parse(self, data: Any, n: int) -> tuple[list[Any], dict[str, list[Any]]]:
        raise NotImplementedError

    def parse_items(self, data: Any, items: list[Item]) -> tuple[list[Any], dict[str, list[Any]]]:
        """``parse`` for a shape whose reading depends on the items sent (a row's own rubric)."""
        return self.parse(data, len(items))
