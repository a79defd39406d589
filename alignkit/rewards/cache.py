"""A persistent reward cache in one SQLite file.

Keys are SHA-256 hashes of the scoring identity (preset, endpoint, judge settings) and the
request content of one sample, so a changed rubric or endpoint never reuses old scores.
Only successful scores are stored. Each batch is committed at once (WAL journal), so a run
that crashes keeps every score it has paid for, and a restarted run finds them again.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# SQLite limits the number of host parameters of one statement (999 in old builds).
_MAX_PARAMS = 900


def cache_key(identity: str, prompt: str, response: str, label: str | None) -> str:
    """Hex SHA-256 of the scoring identity and one (prompt, response, label) sample."""
    payload = json.dumps([identity, prompt, response, label], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def identity_of(settings: dict[str, Any]) -> str:
    """A stable string for the settings that change what a score means."""
    return json.dumps(settings, sort_keys=True, ensure_ascii=False, default=str)


class ScoreCache:
    """``key -> score`` in SQLite; safe to share between the main and the scoring thread."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a process crash (not an OS crash); FULL costs an fsync
        # per batch for no benefit to a training run.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, value REAL NOT NULL)")

    def get_many(self, keys: Sequence[str]) -> dict[str, float]:
        found: dict[str, float] = {}
        with self._lock:
            for start in range(0, len(keys), _MAX_PARAMS):
                chunk = list(keys[start : start + _MAX_PARAMS])
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(f"SELECT key, value FROM scores WHERE key IN ({marks})", chunk)
                found.update(rows)
        return found

    def put_many(self, items: Iterable[tuple[str, float]]) -> None:
        rows = list(items)
        if not rows:
            return
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO scores (key, value) VALUES (?, ?)", rows)
            self._db.execute("COMMIT")

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM scores").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
