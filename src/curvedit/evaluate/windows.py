"""The memorized-windows file format: prefix/suffix windows and the JSONL rows that hold them.

A window is a prefix P and a suffix S of token ids cut from one document. `find-memorized`
and `implant` write one JSON object per line; `evaluate`, `sweep`, `analyze` and `baseline bsn`
read them. A row gives `prefix_ids` and `suffix_ids` (lists of integers), or `prefix` and
`suffix` text (tokenized without special tokens); `source`, `document`, `offset` are
optional, and `"memorized": false` rows (from `--keep-all`) are skipped when reading.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curvedit.data import DataError, iter_jsonl


@dataclass(frozen=True)
class Window:
    """A prefix/suffix pair cut from one document.

    Attributes:
        prefix_ids: the prompt tokens.
        suffix_ids: the tokens a memorizing model continues with.
        source: the file (or dataset) of the document.
        document: the document's row index in that source (-1 when unknown).
        offset: the token offset of the prefix in the document.
    """

    prefix_ids: list[int]
    suffix_ids: list[int]
    source: str = ""
    document: int = -1
    offset: int = 0


def read_memorized(path: str | Path, tokenizer: Any | None = None, *, only_memorized: bool = True) -> list[Window]:
    """Read a memorized-windows JSONL file (as `find-memorized` writes it, or hand-made).

    A row gives `prefix_ids` and `suffix_ids`, or `prefix` and `suffix` text (then
    tokenized without special tokens). `source`, `document` and `offset` are optional.

    Args:
        path: the JSONL file.
        tokenizer: needed for rows that give text only.
        only_memorized: skip rows with `"memorized": false` (from `--keep-all`).

    Returns:
        The windows, in file order.

    Raises:
        DataError: a malformed line (with its line number), an empty prefix or suffix,
            a text row without a tokenizer, or a file without any window.
        FileNotFoundError: the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"memorized-windows file not found: {path}")
    windows = []
    for line_no, where, row in iter_jsonl(path):
        if only_memorized and row.get("memorized") is False:
            continue
        prefix, suffix = (_ids_field(row, part, tokenizer, where) for part in ("prefix", "suffix"))
        windows.append(Window(prefix, suffix, str(row.get("source", path)), int(row.get("document", line_no - 1)),
                              int(row.get("offset", 0))))
    if not windows:
        raise DataError(f"{path}: no memorized window in the file")
    return windows


def _ids_field(row: dict[str, Any], part: str, tokenizer: Any | None, where: str) -> list[int]:
    ids = row.get(f"{part}_ids")
    if ids is None:
        text = row.get(part)
        if not isinstance(text, str):
            raise DataError(f"{where}: row needs '{part}_ids' (a list of integers) or '{part}' (a string)")
        if tokenizer is None:
            raise DataError(f"{where}: '{part}' is text and the model has no tokenizer; give '{part}_ids'")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
        raise DataError(f"{where}: '{part}_ids' must be a list of integers")
    if not ids:
        raise DataError(f"{where}: the {part} is empty")
    return ids
