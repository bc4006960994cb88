"""The stage kit the demo and the studies share: a timer of named stages, and a JSON cache
that keeps a stage's result under the key of what it depends on (read-only inside
`records_only`, which is how `curvedit study status` sees what is left to run).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Callable, Iterator

from curvedit.io import digest, write_json


class Timer:
    """Wall-clock seconds per named stage.

    Args:
        log: called with each stage's name before it runs (None: silent).
    """

    def __init__(self, log: Callable[[str], None] | None = None) -> None:
        """Start with no stage timed."""
        self.seconds: dict[str, float | None] = {}
        self._log = log

    def stage(self, name: str, fn: Callable[[], Any], record: Path | None = None) -> Any:
        """Run `fn` as stage `name` and keep its seconds.

        Args:
            name: the stage's name in `seconds`.
            fn: the work.
            record: the stage's cache file (see `cached`); when given, the seconds kept are the
                ones that file holds from the run that computed it (None when it holds none),
                so a stage read back from the cache reports what it cost to compute.

        Returns:
            What `fn` returns.
        """
        if self._log is not None:
            self._log(name)
        start = time.perf_counter()
        try:
            return fn()
        finally:
            elapsed = round(time.perf_counter() - start, 1)
            self.seconds[name] = compute_seconds(record) if record is not None else elapsed


def content_key(data: Any) -> str:
    """A short SHA-256 of `data` as sorted JSON (the key a cached stage is stored under)."""
    return digest(data)[:16]


class NotRecorded(Exception):
    """A stage with no record of its key, met inside `records_only` (where nothing is computed).

    Attributes:
        path: the stage's record file.
    """

    def __init__(self, path: Path) -> None:
        """Name the record that is missing or holds another key."""
        super().__init__(f"{path} holds no record of this stage")
        self.path = path


_RECORDS_ONLY: ContextVar[bool] = ContextVar("records_only", default=False)


@contextmanager
def records_only() -> Iterator[None]:
    """Within this block `cached` only reads: a stage it would compute raises `NotRecorded`."""
    token = _RECORDS_ONLY.set(True)
    try:
        yield
    finally:
        _RECORDS_ONLY.reset(token)


def cached(path: Path, key: str, compute: Callable[[], Any]) -> Any:
    """Read `path` when it holds the result of `key`, else compute, write (with the seconds
    the computation took) and return it.

    Raises:
        NotRecorded: inside `records_only`, when `path` holds no result of `key`.
    """
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return stored["value"]
    if _RECORDS_ONLY.get():
        raise NotRecorded(path)
    start = time.perf_counter()
    value = compute()
    write_json(path, {"key": key, "value": value, "seconds": round(time.perf_counter() - start, 1)})
    return value


def compute_seconds(path: Path) -> float | None:
    """The seconds a stage's cache file says its computation took (None when it does not say)."""
    return json.loads(path.read_text()).get("seconds") if path.is_file() else None
