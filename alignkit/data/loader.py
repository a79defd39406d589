"""Datasets in LLaMA-Factory's conventions, read into one ``Example`` shape.

A dataset is a name registered in ``<dataset_dir>/dataset_info.json`` or a path to a
``.json`` / ``.jsonl`` file, whose format is then detected from its first row. Rows are
``alpaca`` (instruction/input/output, history, system), ``sharegpt`` (a message list with
configurable tags), preference rows of either shape (chosen/rejected strings or message
objects, optional margin), or prompt-only rows (prompt/query, optional reference answer).
KTO reads either preference rows or conversations whose last (assistant) turn is labelled
desirable or not by a ``kto_tag`` column (LLaMA-Factory's name).

Rows of either format may carry images (LLaMA-Factory's multimodal format): an ``images`` column
listing paths (relative to ``dataset_dir``, or absolute), one ``<image>`` placeholder per image in
the message text, in order. The paths and the placeholder count are checked here, row by row;
turning placeholders into a model's image tokens is ``alignkit.data.vision``'s job.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

Kind = Literal["sft", "pairwise", "prompt", "kto"]

ALPACA_COLUMNS = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "system": "system",
    "history": "history",
    "chosen": "chosen",
    "rejected": "rejected",
    "margin": "margin",
    "label": "label",
    "kto_tag": "kto_tag",
    "images": "images",
}
SHAREGPT_COLUMNS = {
    "messages": "conversations",
    "system": "system",
    "chosen": "chosen",
    "rejected": "rejected",
    "margin": "margin",
    "kto_tag": "kto_tag",
    "images": "images",
}
SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
OPENAI_TAGS = {
    **SHAREGPT_TAGS,
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "observation_tag": "tool",
}
UNSUPPORTED_COLUMNS = {"videos", "audios", "tools"}
IMAGE_PLACEHOLDER = "<image>"  # LLaMA-Factory's: one per image, where the image goes in the text
REGISTRY_KEYS = {"file_name", "formatting", "columns", "tags", "ranking", "split", "num_samples"}


class DataError(ValueError):
    """A dataset problem; the message names the file, the 0-based row index and what is wrong."""


@dataclass
class Example:
    """One row, normalised.

    ``messages`` holds ``{"role", "content"}`` dicts with roles ``user``, ``assistant`` and
    ``tool``. For ``sft`` it is the whole conversation ending with an assistant turn; for
    ``pairwise`` and ``prompt`` it is the prompt conversation ending with a user/tool turn.
    """

    messages: list[dict]
    system: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    margin: float | None = None
    label: str | None = None
    kto_tag: bool | None = None  # kind "kto", unpaired rows: the last assistant turn is desirable (True) or not
    source: str = ""
    images: list[str] = field(default_factory=list)  # absolute paths, in the order of the <image> placeholders
    columns: dict[str, Any] = field(default_factory=dict)  # raw cells of the columns a caller asked to keep

    def last_user_text(self) -> str:
        """The latest user turn: the prompt a reward source (rule, model, judge) is shown.

        Earlier turns and the system prompt stay out, so a judge scores the answer to the
        question just asked; ``""`` when the conversation has no user turn.
        """
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")


@dataclass
class DatasetSpec:
    """How to read one file: the registry entry, or what was detected from its first row."""

    path: Path
    formatting: Literal["alpaca", "sharegpt"] = "alpaca"
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    ranking: bool = False
    media_dir: Path | None = None  # relative image paths start here (dataset_dir), else at the file's folder
    num_samples: int | None = None  # dataset_info.json: draw this many rows (with repeats past the file's size)


class RowError(Exception):
    """Raised inside row parsing; turned into a DataError with file and row by the caller."""


# ---------------------------------------------------------------- public entry points


def load_examples(
    dataset: str | list[str],
    dataset_dir: str | None,
    kind: Kind,
    max_samples: int | None = None,
    skip_bad_rows: bool = False,
    keep_columns: tuple[str, ...] = (),
) -> list[Example]:
    """Load and normalise every dataset in ``dataset`` (a list or a comma-separated string).

    ``max_samples`` caps each dataset (the first valid rows are kept). A malformed row raises
    ``DataError``; with ``skip_bad_rows`` it is skipped and the count is logged as a warning.
    ``keep_columns``: raw cells each example keeps in ``columns`` (a reward's per-row inputs).
    """
    if kind not in ("sft", "pairwise", "prompt", "kto"):
        raise ValueError(f"kind must be 'sft', 'pairwise', 'prompt' or 'kto', got {kind!r}")
    names = [n.strip() for n in (dataset.split(",") if isinstance(dataset, str) else dataset) if n.strip()]
    if not names:
        raise DataError("no dataset given")
    registry = _read_registry(dataset_dir)
    examples: list[Example] = []
    for name in names:
        specs = _resolve(name, dataset_dir, registry)
        num_samples = specs[0].num_samples if specs else None
        rows: list[Example] = []
        for spec in specs:
            spec.media_dir = Path(dataset_dir) if dataset_dir else None
            rows.extend(_load_file(spec, kind, None if num_samples else max_samples, skip_bad_rows, keep_columns))
        if num_samples is not None:  # LLaMA-Factory's order: sample num_samples, then cut to max_samples
            logger.info("dataset %r: num_samples=%d rows drawn from its %d", name, num_samples, len(rows))
            rows = sample_rows(rows, num_samples)[:max_samples]
        examples.extend(rows)
    return examples


NUM_SAMPLES_SEED = 0  # the rows num_samples draws are the same on every run and every rank


def sample_rows(rows: list[Example], n: int) -> list[Example]:
    """``n`` rows as LLaMA-Factory's ``num_samples`` draws them: a shuffle of all rows cut to ``n``,
    and past the file's size every row once plus random repeats."""
    if not rows:
        return []
    rng = random.Random(NUM_SAMPLES_SEED)
    idx = rng.sample(range(len(rows)), len(rows))[:n]
    idx += rng.choices(range(len(rows)), k=n - len(idx))
    return [rows[i] for i in idx]


def dataset_problems(dataset: str | list[str], dataset_dir: str | None) -> list[str]:
    """Every dataset name that does not resolve to files (unregistered, a bad entry, a missing
    file), without reading any rows: what config validation reports before a model loads."""
    names = [n.strip() for n in (dataset.split(",") if isinstance(dataset, str) else dataset) if str(n).strip()]
    try:
        registry = _read_registry(dataset_dir)
    except DataError as e:
        return [str(e)]
    problems = []
    for name in names:
        try:
            _resolve(name, dataset_dir, registry)
        except DataError as e:
            problems.append(str(e))
    return problems


def split_train_val(
    examples: list[Example], val_size: float | int, seed: int
) -> tuple[list[Example], list[Example]]:
    """Hold out ``val_size`` examples: a float in (0, 1) is a fraction, an int a count.

    The choice is a seeded shuffle, so it is the same on every run and every rank; both parts
    keep the original order.
    """
    n = len(examples)
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise ValueError(f"val_size must be a fraction in (0, 1) or a count, got {val_size!r}")
    if isinstance(val_size, float):
        if not 0.0 <= val_size < 1.0:
            raise ValueError(f"val_size as a float must be in [0, 1), got {val_size}; use an int for a count")
        n_val = max(1, round(n * val_size)) if val_size > 0 else 0
    else:
        n_val = val_size
    if n_val == 0:
        return list(examples), []
    if not 0 < n_val < n:
        raise ValueError(f"val_size={val_size} must leave at least one of {n} examples for training")
    held = set(random.Random(seed).sample(range(n), n_val))
    train = [e for i, e in enumerate(examples) if i not in held]
    val = [e for i, e in enumerate(examples) if i in held]
    return train, val


# ---------------------------------------------------------------- registry and files


def _read_registry(dataset_dir: str | None) -> dict[str, Any]:
    if dataset_dir is None:
        return {}
    path = Path(dataset_dir) / "dataset_info.json"
    if not path.is_file():
        return {}
    try:
        registry = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
    if not isinstance(registry, dict):
        raise DataError(f"{path}: expected an object mapping dataset names to entries")
    return registry


def _resolve(name: str, dataset_dir: str | None, registry: dict[str, Any]) -> list[DatasetSpec]:
    if name in registry:
        return _specs_from_entry(name, registry[name], Path(dataset_dir or "."))
    for candidate in (Path(name), Path(dataset_dir or ".") / name):
        if candidate.is_file():
            return [DatasetSpec(path=candidate)]  # detected from its first row later
    known = ", ".join(sorted(registry)) or "none"
    where = f"{Path(dataset_dir) / 'dataset_info.json'}" if dataset_dir else "no dataset_dir given"
    raise DataError(f"dataset {name!r} is neither registered ({where}; known: {known}) nor an existing file")


def _specs_from_entry(name: str, entry: Any, root: Path) -> list[DatasetSpec]:
    where = f"{root / 'dataset_info.json'}: dataset {name!r}"
    if not isinstance(entry, dict) or "file_name" not in entry:
        raise DataError(f"{where}: entry needs 'file_name' (hub and script datasets are not supported)")
    if unknown := set(entry) - REGISTRY_KEYS:
        raise DataError(f"{where}: unsupported keys {sorted(unknown)}; supported: {sorted(REGISTRY_KEYS)}")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise DataError(f"{where}: formatting must be 'alpaca' or 'sharegpt', got {formatting!r}")
    columns, tags = entry.get("columns", {}), entry.get("tags", {})
    defaults = ALPACA_COLUMNS if formatting == "alpaca" else SHAREGPT_COLUMNS
    if bad := set(columns) & UNSUPPORTED_COLUMNS:
        raise DataError(f"{where}: columns {sorted(bad)} are not supported by alignkit")
    if unknown := set(columns) - set(defaults):
        raise DataError(
            f"{where}: unknown columns {sorted(unknown)} for {formatting}; known: {sorted(defaults)}"
        )
    if unknown := set(tags) - set(SHAREGPT_TAGS):
        raise DataError(f"{where}: unknown tags {sorted(unknown)}; known: {sorted(SHAREGPT_TAGS)}")
    if (split := entry.get("split", "train")) != "train":
        raise DataError(f"{where}: split {split!r} cannot be honoured: a local file is one 'train' split (as "
                        "LLaMA-Factory loads it too). Remove 'split' or set it to 'train'; for held-out data use "
                        "val_size, or register the held-out file as its own dataset.")
    num_samples = entry.get("num_samples")
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples < 1):
        raise DataError(f"{where}: num_samples must be a whole number >= 1, got {num_samples!r}")
    path = root / entry["file_name"]
    if path.is_dir():
        paths = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl"))
    elif path.is_file():
        paths = [path]
    else:
        raise DataError(f"{where}: file {path} does not exist")
    tag_map = {**SHAREGPT_TAGS, **tags} if tags else {}  # empty: detected from the first message
    return [
        DatasetSpec(p, formatting, {**defaults, **columns}, tag_map, bool(entry.get("ranking", False)),
                    num_samples=num_samples)
        for p in paths
    ]


def _read_rows(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {i + 1}: invalid JSON: {e.msg}") from e
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of rows (or a .jsonl file)")
    return rows


def _detect(spec: DatasetSpec, first: Any) -> DatasetSpec:
    """Columns for a plain file, from the keys of its first row."""
    if not isinstance(first, dict):
        raise DataError(f"{spec.path}: row 0: expected an object, got {type(first).__name__}")
    ranking = "chosen" in first and "rejected" in first
    for key in ("conversations", "messages"):
        if key in first:
            return DatasetSpec(spec.path, "sharegpt", {**SHAREGPT_COLUMNS, "messages": key}, {}, ranking)
    prompt_key = next((k for k in ("instruction", "prompt", "question", "query") if k in first), None)
    if prompt_key is None:
        raise DataError(
            f"{spec.path}: row 0: cannot detect the format from keys {sorted(first)}; expected "
            "'conversations'/'messages' (sharegpt), 'instruction' (alpaca) or 'prompt'/'question'/'query'"
        )
    columns = {**ALPACA_COLUMNS, "prompt": prompt_key}
    if prompt_key != "instruction":
        columns["query"] = "input"  # 'query' as the prompt itself is not also an extra input
        columns["response"] = next(
            (k for k in ("response", "output", "labels", "answer") if k in first), "output"
        )
    return DatasetSpec(spec.path, "alpaca", columns, {}, ranking)


def _load_file(spec: DatasetSpec, kind: Kind, max_samples: int | None, skip_bad_rows: bool,
               keep_columns: tuple[str, ...] = ()) -> list[Example]:
    rows = _read_rows(spec.path)
    if not rows:
        return []
    if not spec.columns:
        spec = _detect(spec, rows[0])
    if kind == "pairwise" and not spec.ranking:
        raise DataError(
            f"{spec.path}: kind 'pairwise' needs preference rows (chosen/rejected; 'ranking': true)"
        )
    if kind == "sft" and spec.ranking:
        raise DataError(f"{spec.path}: preference data (chosen/rejected) cannot be used for sft")
    if spec.formatting == "sharegpt" and not spec.tags:
        spec.tags = _detect_tags(rows[0], spec.columns["messages"])
    parse = _parse_alpaca if spec.formatting == "alpaca" else _parse_sharegpt
    out: list[Example] = []
    bad, first_error = 0, ""
    for i, row in enumerate(rows):
        if max_samples is not None and len(out) >= max_samples:
            break
        try:
            if not isinstance(row, dict):
                raise RowError(f"expected an object, got {type(row).__name__}")
            ex = parse(row, spec, kind)
            ex.images = _images(row, spec, ex)
        except RowError as e:
            msg = f"{spec.path}: row {i}: {e}"
            if not skip_bad_rows:
                raise DataError(msg) from None
            bad, first_error = bad + 1, first_error or msg
            continue
        ex.source = f"{spec.path}:{i}"
        ex.columns = {c: row.get(c) for c in keep_columns}
        out.append(ex)
    if bad:
        logger.warning(
            "skipped %d malformed rows of %d in %s (first: %s)", bad, len(rows), spec.path, first_error
        )
    return out


def _images(row: dict, spec: DatasetSpec, ex: Example) -> list[str]:
    """The row's image paths, resolved and checked against its ``<image>`` placeholders.

    A row without the images column is text, even if its text happens to contain ``<image>``.
    """
    key = spec.columns.get("images", "images")
    value = row.get(key)
    if value is None:
        return []
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not all(isinstance(p, str) and p.strip() for p in paths):
        raise RowError(f"{key!r} must be a list of image paths (strings), got {value!r}")
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in ex.messages)
    if placeholders != len(paths):
        raise RowError(
            f"{len(paths)} image(s) in {key!r} but {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) in the text; "
            f"put exactly one {IMAGE_PLACEHOLDER} where each image goes (in order), as LLaMA-Factory expects"
        )
    return [_image_path(p, spec) for p in paths]


def _image_path(path: str, spec: DatasetSpec) -> str:
    """An absolute path: as given, else under ``dataset_dir`` (LLaMA-Factory's media_dir), else next to the file."""
    p = Path(path)
    candidates = [p] if p.is_absolute() else [d / p for d in (spec.media_dir, spec.path.parent) if d is not None]
    for c in candidates:
        if c.is_file():
            return str(c.resolve())
    tried = " or ".join(str(c) for c in dict.fromkeys(candidates))
    raise RowError(f"image {path!r} not found (looked for {tried}); image paths are relative to dataset_dir, "
                   "or absolute")


def _detect_tags(first: Any, messages_key: str) -> dict[str, str]:
    msgs = first.get(messages_key) if isinstance(first, dict) else None
    if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict) and "role" in msgs[0]:
        return dict(OPENAI_TAGS)
    return dict(SHAREGPT_TAGS)


# ---------------------------------------------------------------- row parsing


def _text(row: dict, key: str, what: str, required: bool = True, allow_empty: bool = False) -> str | None:
    if key not in row or row[key] is None:
        if required:
            raise RowError(f"missing key {key!r} ({what})")
        return None
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"{key!r} ({what}) must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        if required:
            raise RowError(f"{key!r} ({what}) is empty")
        return None
    return value


def _margin(row: dict, key: str) -> float | None:
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowError(f"{key!r} (margin) must be a number, got {type(value).__name__}")
    return float(value)


def _kto_tag(row: dict, key: str) -> bool:
    value = row.get(key)
    if not isinstance(value, bool):
        raise RowError(f"{key!r} (kto_tag) must be true (desirable) or false (undesirable), got {value!r}; "
                       "or give chosen/rejected pairs")
    return value


def _label(row: dict, keys: list[str]) -> str | None:
    for key in keys:
        value = row.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise RowError(
                f"{key!r} (reference answer) must be a string or number, got {type(value).__name__}"
            )
        return str(value)
    return None


def _response(value: Any, key: str, spec: DatasetSpec) -> str:
    """A chosen/rejected answer: a plain string or a message object ``{from: gpt, value: ...}``."""
    if isinstance(value, dict):
        tags = spec.tags or SHAREGPT_TAGS
        role = value.get(tags["role_tag"])
        if role not in (None, tags["assistant_tag"], tags["function_tag"]):
            raise RowError(f"{key!r} must be an assistant message, got role {role!r}")
        value = value.get(tags["content_tag"])
    if not isinstance(value, str):
        raise RowError(f"{key!r} must be a string or an assistant message object, got {type(value).__name__}")
    if not value.strip():
        raise RowError(f"{key!r} is empty")
    return value


def _finish(messages: list[dict], system: str | None, row: dict, spec: DatasetSpec, kind: Kind) -> Example:
    """Check the conversation's shape for ``kind`` and build the Example."""
    c = spec.columns
    for j, m in enumerate(messages):
        expect = ("user", "tool") if j % 2 == 0 else ("assistant",)
        if m["role"] not in expect:
            raise RowError(
                f"conversation does not alternate: message {j} is {m['role']!r}, expected {expect[0]!r}"
            )
    if spec.ranking:
        if not messages or messages[-1]["role"] == "assistant":
            raise RowError("the prompt of a preference row must end with a user turn")
        ex = Example(messages, system, margin=_margin(row, c["margin"]))
        if kind in ("pairwise", "kto"):
            ex.chosen = _response(row.get(c["chosen"]), c["chosen"], spec)
            ex.rejected = _response(row.get(c["rejected"]), c["rejected"], spec)
        return ex
    if kind == "sft":
        if not messages or messages[-1]["role"] != "assistant":
            raise RowError("conversation must end with an assistant turn for sft")
        return Example(messages, system)
    if kind == "kto":
        if not messages or messages[-1]["role"] != "assistant":
            raise RowError("conversation must end with the assistant turn its kto_tag labels")
        return Example(messages, system, kto_tag=_kto_tag(row, c["kto_tag"]))
    if messages and messages[-1]["role"] == "assistant":
        return Example(messages[:-1], system, label=messages[-1]["content"])
    return Example(messages, system)


def _parse_alpaca(row: dict, spec: DatasetSpec, kind: Kind) -> Example:
    c = spec.columns
    prompt = _text(row, c["prompt"], "instruction")
    query = _text(row, c["query"], "input", required=False, allow_empty=True)
    if query:
        prompt = f"{prompt}\n{query}"
    system = _text(row, c["system"], "system", required=False)
    messages: list[dict] = []
    history = row.get(c["history"])
    if history is not None:
        if not isinstance(history, list):
            raise RowError(f"{c['history']!r} must be a list of [user, assistant] pairs")
        for j, turn in enumerate(history):
            if not (
                isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)
            ):
                raise RowError(f"{c['history']!r}[{j}] must be a [user, assistant] pair of strings")
            if not (turn[0].strip() and turn[1].strip()):
                raise RowError(f"{c['history']!r}[{j}] has empty content")
            messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    messages.append({"role": "user", "content": prompt})
    if spec.ranking:
        return _finish(messages, system, row, spec, kind)
    if kind == "prompt":
        return Example(messages, system, label=_label(row, [c["response"], c["label"], "labels"]))
    response = _text(row, c["response"], "response")
    messages.append({"role": "assistant", "content": response})
    return _finish(messages, system, row, spec, kind)


def _parse_sharegpt(row: dict, spec: DatasetSpec, kind: Kind) -> Example:
    c, t = spec.columns, spec.tags
    raw = row.get(c["messages"])
    if raw is None:
        raise RowError(f"missing key {c['messages']!r} (conversation)")
    if not isinstance(raw, list) or not raw:
        raise RowError(f"{c['messages']!r} must be a non-empty list of messages")
    roles = {
        t["user_tag"]: "user",
        t["assistant_tag"]: "assistant",
        t["observation_tag"]: "tool",
        t["function_tag"]: "assistant",
        t["system_tag"]: "system",
    }
    system = _text(row, c["system"], "system", required=False)
    messages: list[dict] = []
    for j, m in enumerate(raw):
        if not isinstance(m, dict):
            raise RowError(f"message {j} must be an object, got {type(m).__name__}")
        if t["role_tag"] not in m or t["content_tag"] not in m:
            raise RowError(f"message {j} needs keys {t['role_tag']!r} and {t['content_tag']!r}")
        role, content = m[t["role_tag"]], m[t["content_tag"]]
        if role not in roles:
            raise RowError(f"message {j} has unknown role {role!r}; expected one of {sorted(roles)}")
        if not isinstance(content, str) or not content.strip():
            raise RowError(f"message {j} has empty or non-string content")
        if roles[role] == "system":
            if j != 0:
                raise RowError(f"message {j}: a system message is only allowed first")
            system = system or content
            continue
        messages.append({"role": roles[role], "content": content})
    return _finish(messages, system, row, spec, kind)


def column_cells(dataset: str | list[str], dataset_dir: str | None, column: str) -> list[tuple[str, Any]]:
    """(``"<file>: row <i>"``, the row's ``column`` cell) for every row of the datasets, read without
    parsing the rows (what config validation can afford; the loader checks the rest later)."""
    names = [n.strip() for n in (dataset.split(",") if isinstance(dataset, str) else dataset) if str(n).strip()]
    registry = _read_registry(dataset_dir)
    cells = []
    for name in names:
        for spec in _resolve(name, dataset_dir, registry):
            cells += [(f"{spec.path}: row {i}", row.get(column) if isinstance(row, dict) else None)
                      for i, row in enumerate(_read_rows(spec.path))]
    return cells
