"""``reward_api.criteria_column``: each dataset row may carry its own rubric.

Rubrics as Rewards (arXiv 2507.17746) writes criteria per prompt: what makes a good answer to a
proof is not what makes one to a recipe. A row's cell holds a list of criteria in the shape of
``reward_api.criteria`` (``[{name, weight, description}, ...]``, or that list as a JSON string).
It is merged with the global ``criteria`` by name: a row criterion replaces the global one of the
same name, and new names are added after the global ones. The merged rubric travels with the row
to the judge as canonical JSON text (``ScoreMeta.criteria``), so it is also part of a cached score's key.

A bad cell is a config problem: every one is reported at once, naming the file, the row and the
column, before any model loads (``column_problems``), and again if the Python API skips that check.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from pydantic import TypeAdapter, ValidationError

from alignkit.rewards.api.criteria import Criterion

_CRITERIA = TypeAdapter(list[Criterion])
# What a sample is judged on when it has no rubric at all: the start-up probe, canaries and reward_probe
# rows, which are not dataset rows, under a criteria_column without global criteria.
FALLBACK = [Criterion(name="overall", weight=1.0, description="The response answers the prompt correctly and well.")]


def parse_cell(value: Any) -> list[Criterion] | None:
    """A cell's criteria; ``None`` for an empty cell (the row keeps the global rubric).
    Raises ``ValueError`` with one sentence saying what is wrong."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError(f"is a string but not JSON: {value[:80]!r}") from None
    if not isinstance(value, list):
        raise ValueError(f"must be a list of criteria [{{name, weight, description}}, ...], got a {type(value).__name__}")
    try:
        criteria = _CRITERIA.validate_python(value)
    except ValidationError as e:
        raise ValueError(", ".join(f"criterion {err['loc'][0]} {'.'.join(map(str, err['loc'][1:]))}: {err['msg']}"
                                   for err in e.errors())) from None
    names = [c.name for c in criteria]
    if len(set(names)) != len(names):
        raise ValueError(f"criterion names must be unique in a row, got {names}")
    return criteria


def merge(base: list[Criterion], row: list[Criterion] | None) -> list[Criterion]:
    """The row's rubric: the global criteria with the row's replacing those of the same name, new ones after."""
    if not row:
        return list(base)
    own = {c.name: c for c in row}
    return [own.pop(c.name, c) for c in base] + list(own.values())


def encode(criteria: list[Criterion]) -> str:
    """Canonical JSON text of a rubric: what travels with the sample and keys the cache."""
    return json.dumps([c.model_dump() for c in criteria], sort_keys=True, separators=(",", ":"))


@lru_cache(maxsize=4096)
def decode(text: str) -> list[Criterion]:
    return _CRITERIA.validate_json(text)


def row_rubrics(cells: list[tuple[str, Any]], base: list[Criterion], column: str) -> tuple[list[str | None], list[str]]:
    """Each row's merged rubric as JSON text (``None`` where it has no cell and there is no global
    rubric to fall back on: a problem) and every problem, as ``"<where>: column 'c': ..."``.
    ``cells``: (where, cell value) per row, where = ``"<file>: row <i>"``."""
    out: list[str | None] = []
    problems: list[str] = []
    for where, value in cells:
        try:
            row = parse_cell(value)
        except ValueError as e:
            problems.append(f"{where}, column {column!r}: {e}")
            out.append(None)
            continue
        if row is None and not base:
            problems.append(f"{where}, column {column!r}: empty, and reward_api.criteria is not set, so the row "
                            "has no rubric (give it criteria or set reward_api.criteria)")
        rubric = merge(base, row)
        out.append(encode(rubric) if rubric else None)
    return out, problems


def column_problems(raw: dict[str, Any]) -> list[tuple[str, str]]:
    """Config validation: every bad rubric cell of ``reward_api.criteria_column`` in the run's datasets."""
    from alignkit.data.loader import DataError, column_cells

    api = raw.get("reward_api")
    column = api.get("criteria_column") if isinstance(api, dict) else None
    dataset = raw.get("dataset")
    if not isinstance(column, str) or not column or not isinstance(dataset, str | list) or not dataset:
        return []
    try:
        base = _CRITERIA.validate_python(api.get("criteria") or [])
    except ValidationError:
        return []  # reported as a key problem already
    try:
        cells = column_cells(dataset, raw.get("dataset_dir", "data"), column)
    except DataError:
        return []  # the dataset itself is reported by path_problems
    _, problems = row_rubrics(cells, base, column)
    return [("reward_api", _described(problems))] if problems else []


def _described(problems: list[str]) -> str:
    """Every bad row in one sentence (the first ten, then a count: one paragraph, not a page)."""
    more = f"; and {len(problems) - 10} more rows" if len(problems) > 10 else ""
    return (f"key 'reward_api.criteria_column': {len(problems)} row(s) with a bad rubric: "
            + "; ".join(problems[:10]) + more)


def examples_criteria(cfg: Any, examples: list[Any]) -> list[str | None] | None:
    """Each loaded example's rubric for a run whose judge reads ``criteria_column`` (``None`` otherwise);
    raises ``ValueError`` naming every bad row (a Python caller that skipped config validation)."""
    api = getattr(cfg, "reward_api", None) if getattr(cfg, "reward_model_type", None) == "api" else None
    column = getattr(api, "criteria_column", None)
    if not column:
        return None
    # ex.source is "<file>:<row>"; the rows are named as config validation names them.
    cells = [(f"{ex.source.rpartition(':')[0]}: row {ex.source.rpartition(':')[2]}", ex.columns.get(column))
             for ex in examples]
    rubrics, problems = row_rubrics(cells, list(api.criteria or []), column)
    if problems:
        raise ValueError(_described(problems))
    return rubrics
