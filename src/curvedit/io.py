"""Atomic file writes: write beside the destination, then rename, so a crash never leaves
a half-written file that looks whole; and the journal of a long job's finished items, so an
interrupted job resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from curvedit.errors import CurveditError


class JournalError(CurveditError):
    """A journal that belongs to another run, or that cannot be read."""


def _default_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0o666 less the process umask. The umask is
    read from /proc where it can be (setting it to read it is not thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # `.NAME.XXXXXXXX.tmp` beside NAME (`curvedit.cli.common.is_temporary` recognises these)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _default_mode())  # mkstemp makes 0600 files; outputs get the user's usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON (indented) atomically, each mapping's keys in the order they were given, so a
    reader gets the writer's order back (a report written from the file reads as the run's own)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")

    _atomic(Path(path), write)


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (tensors made contiguous, moved to CPU)."""
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(Path(path), lambda tmp: save_file(cpu, tmp, metadata=metadata))


def file_sha256(path: str | Path) -> str:
    """The SHA-256 hex digest of a file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def safetensors_metadata(path: str | Path, error: type[Exception]) -> dict[str, str]:
    """The string metadata of a safetensors file's header.

    Raises:
        error: the file is not a readable safetensors file (the message names it).
    """
    from safetensors import safe_open  # noqa: PLC0415

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise error(f"{path}: not a readable safetensors file ({err})") from None


def display_path(path: str | Path) -> str:
    """`path` relative to the working directory when it lies below it (what a report shows, so
    it reads the same on another machine), else as given."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def digest(data: Any) -> str:
    """SHA-256 of `data` as sorted-key JSON (paths and other objects by `str`)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


class Journal:
    """An append-only JSONL file of a long job's finished items, tied to one run by a key.

    The first line holds the key (a digest of everything the items depend on); each later
    line is one finished item, flushed to disk before the next item starts. Opening an
    existing journal gives its items back, so the job skips them; a line cut off by a kill
    is dropped. A journal whose key differs belongs to another run and is refused, so a
    resume never mixes two runs.

    Args:
        path: the journal file (created with its folder by the first item).
        key: the run's key (`digest` of what the items depend on).
        what: what the job is, for messages ("sweep").

    Raises:
        JournalError: the file holds another run's items, or is not a journal.
    """

    def __init__(self, path: str | Path, key: str, what: str) -> None:
        """Open (or start) the journal at `path`; see the class."""
        self.path, self.key, self.what = Path(path), key, what
        self.items: list[dict[str, Any]] = self._read() if self.path.exists() else []

    def _read(self) -> list[dict[str, Any]]:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        rows = []
        for number, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines) - 1 and number > 0:  # the item a kill cut off: redo it
                    self._write_lines(rows)
                    break
                raise JournalError(f"{self.path}: line {number + 1} is not JSON; not a {self.what} journal") from None
        header = rows[0] if rows else {}
        if not isinstance(header, dict) or header.get("journal") != self.what:
            raise JournalError(f"{self.path} is not a {self.what} journal; give another path or remove it")
        if header.get("key") != self.key:
            raise JournalError(f"{self.path} holds another {self.what}'s finished items (other model, data or "
                               "settings); remove it to start this one afresh, or give another path")
        return rows[1:]

    def _write_lines(self, rows: list[dict[str, Any]]) -> None:
        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as handle:
                handle.writelines(json.dumps(row, sort_keys=True) + "\n" for row in rows)

        _atomic(self.path, write)

    def append(self, item: dict[str, Any]) -> None:
        """Record one finished item (written and synced before returning; the file, with its
        key, is created by the first)."""
        if not self.path.exists():
            self._write_lines([{"journal": self.what, "key": self.key}])
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(item, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.items.append(item)

    def remove(self) -> None:
        """Delete the journal (the job finished and its result is written elsewhere)."""
        self.path.unlink(missing_ok=True)
