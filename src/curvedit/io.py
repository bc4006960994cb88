"""Atomic file writes: write beside the destination, then rename, so a crash never leaves
a half-written file that looks whole."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


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
    """Write JSON (indented, sorted keys) atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
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
