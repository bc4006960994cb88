"""The study's stage cache: a stage's result is kept in a JSON file with the key of what it
depends on, and read back while the key matches.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

from curvedit.io import write_json


def content_key(data: Any) -> str:
    """A short SHA-256 of `data` as sorted JSON (the key a cached stage is stored under)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached(path: Path, key: str, compute: Callable[[], Any]) -> Any:
    """Read `path` when it holds the result of `key`, else compute, write (with the seconds
    the computation took) and return it."""
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return stored["value"]
    start = time.perf_counter()
    value = compute()
    write_json(path, {"key": key, "value": value, "seconds": round(time.perf_counter() - start, 1)})
    return value


def compute_seconds(path: Path) -> float | None:
    """The seconds a stage's cache file says its computation took (None when it does not say)."""
    return json.loads(path.read_text()).get("seconds") if path.is_file() else None
