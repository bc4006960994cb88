"""Reading corpora and turning them into padded batches of token ids.

Sources: a `.jsonl` file (rows with `text` or `input_ids`), a `.txt` file (one
document), a directory of such files, or a `datasets` name/path (streamed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from curvedit.errors import CurveditError


class DataError(CurveditError):
    """A corpus that cannot be read as documented (bad line, missing field, empty)."""


@dataclass(frozen=True)
class Record:
    """One document of a corpus.

    Attributes:
        text: the document text, or None when the row gives token ids.
        input_ids: token ids given by the row, or None for a text row.
        source: the file (or dataset) it came from.
        index: the row number in that source (0-based; the JSONL line number minus 1).
    """

    text: str | None
    input_ids: list[int] | None
    source: str
    index: int


def iter_jsonl(path: Path, error: type[DataError] = DataError) -> Iterator[tuple[int, str, dict]]:
    r"""Yield `(line number, "path:line", row)` for each non-blank line of a JSONL file.

    Raises:
        DataError (or `error`): bytes that are not UTF-8, a line that is not valid JSON or
            not a JSON object, or a `\uD800`-style escape of a lone surrogate (not text).
    """
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise error(f"{where}: not UTF-8 text ({err.reason} at byte {err.start} of the line)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise error(f"{where}: expected a JSON object, got {type(row).__name__}")
            if "\\" in line and _has_lone_surrogate(row):
                raise error(f"{where}: holds a lone surrogate escape (\\uD800-\\uDFFF without its pair), "
                            "which is not text")
            yield line_no, where, row


def _has_lone_surrogate(value: Any) -> bool:
    """Whether a decoded JSON value holds a string that UTF-8 cannot encode (a lone surrogate)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def _records_from_jsonl(path: Path, text_field: str) -> Iterator[Record]:
    for line_no, where, row in iter_jsonl(path):
        yield _record_from_row(row, str(path), line_no - 1, where, text_field)


def _record_from_row(row: Any, source: str, index: int, where: str, text_field: str) -> Record:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "input_ids" in row:
        ids = row["input_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise DataError(f"{where}: 'input_ids' must be a list of integers (not true/false)")
        return Record(text=None, input_ids=ids, source=source, index=index)
    if text_field in row:
        if not isinstance(row[text_field], str):
            raise DataError(f"{where}: '{text_field}' must be a string")
        return Record(text=row[text_field], input_ids=None, source=source, index=index)
    raise DataError(f"{where}: row has neither '{text_field}' nor 'input_ids' (keys: {sorted(row)})")


CORPUS_SUFFIXES = (".jsonl", ".txt")


def check_corpus_source(source: str | Path) -> None:
    """Refuse a corpus argument `read_records` cannot read, before anything is computed.

    Raises:
        DataError: an existing file that is not `.jsonl` or `.txt` (a `.json` file is not JSON
            Lines).
        FileNotFoundError: a path-like source (with a suffix, or starting with `.` or `/`) that
            does not exist.
    """
    path = Path(source)
    if path.is_dir():
        return
    if path.exists():
        if path.suffix not in CORPUS_SUFFIXES:
            hint = " (JSON Lines: one object per line, named .jsonl)" if path.suffix == ".json" else ""
            raise DataError(f"{path}: a corpus is a .jsonl or .txt file or a folder of them, not a "
                            f"{path.suffix or 'suffix-less'} file{hint}")
        return
    if path.suffix or str(source).startswith((".", "/")):
        raise FileNotFoundError(f"corpus not found: {source}")


def read_records(source: str | Path, *, text_field: str = "text", split: str = "train") -> Iterator[Record]:
    """Yield the documents of a corpus, lazily.

    Args:
        source: a `.jsonl` or `.txt` file, a directory holding such files (read in
            sorted order), or otherwise a `datasets` name or path (streamed; needs
            the `datasets` package and, for hub names, network access).
        text_field: the JSON/dataset field holding text.
        split: the dataset split, for `datasets` sources.

    Returns:
        An iterator of `Record`.

    Raises:
        DataError: a malformed JSONL line (with its line number), a row without text, a file
            that is not UTF-8, or an existing file of another type (`.json`, ...).
        FileNotFoundError: a path-like source that does not exist.
    """
    path = Path(source)
    check_corpus_source(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in CORPUS_SUFFIXES)
        for file in files:
            yield from read_records(file, text_field=text_field)
        return
    if path.suffix == ".jsonl":
        yield from _records_from_jsonl(path, text_field)
        return
    if path.suffix == ".txt":
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        yield Record(text=text, input_ids=None, source=str(path), index=0)
        return
    try:
        import datasets  # noqa: PLC0415 - optional dependency
    except ImportError as err:
        raise DataError(f"'{source}' is not a file; reading it as a datasets name needs "
                        "`pip install datasets`") from err
    stream = datasets.load_dataset(str(source), split=split, streaming=True)
    for index, row in enumerate(stream):
        yield _record_from_row(row, str(source), index, f"{source}[{index}]", text_field)


def token_sequences(
    records: Iterable[Record], tokenizer: Any | None, seq_len: int, max_tokens: int | None = None
) -> Iterator[list[int]]:
    """Turn documents into model sequences of at most `seq_len` tokens.

    Text documents are tokenized and packed: their tokens are concatenated (an EOS
    token between documents when the tokenizer has one) and cut into `seq_len`
    windows; the last window may be shorter. Rows with `input_ids` are used as
    given, each one its own sequence, cut to `seq_len`, never merged with another.

    Args:
        records: documents from `read_records`.
        tokenizer: an HF tokenizer (needed only for text rows).
        seq_len: maximum sequence length (>= 2: a position needs a next token).
        max_tokens: stop after this many tokens in total (the sequence that crosses
            the budget is cut).

    Returns:
        An iterator of token-id lists.

    Raises:
        DataError: a text row and no tokenizer, or seq_len < 2.
    """
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    budget = max_tokens if max_tokens is not None else float("inf")
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    buffer: list[int] = []
    emitted = 0

    def take(seq: list[int]) -> list[int]:
        nonlocal emitted
        seq = seq[: int(min(len(seq), budget - emitted))]
        emitted += len(seq)
        return seq

    for record in records:
        if emitted >= budget:
            return
        if record.input_ids is not None:
            seq = take(record.input_ids[:seq_len])
            if seq:
                yield seq
            continue
        if tokenizer is None:
            raise DataError(f"{record.source}: text rows need a tokenizer (the model has none; give input_ids)")
        buffer.extend(tokenizer(record.text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            buffer.append(eos)
        while len(buffer) >= seq_len and emitted < budget:
            seq = take(buffer[:seq_len])
            buffer = buffer[seq_len:]
            yield seq
    if buffer and emitted < budget:
        seq = take(buffer)
        if seq:
            yield seq


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad token sequences into `input_ids` and `attention_mask` tensors (B, T).

    Args:
        seqs: token-id sequences, possibly of different lengths (none empty).
        pad_id: the id written at padded positions (masked out either way).
        padding_side: "right" or "left".

    Returns:
        {"input_ids": long (B, T), "attention_mask": long (B, T)}.

    Raises:
        DataError: an empty batch, an empty sequence or an unknown padding side.
    """
    if not seqs or any(len(s) == 0 for s in seqs):
        raise DataError("cannot pad an empty batch or an empty sequence")
    if padding_side not in ("right", "left"):
        raise DataError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    width = max(len(s) for s in seqs)
    ids_bt = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask_bt = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        span = slice(0, len(seq)) if padding_side == "right" else slice(width - len(seq), width)
        ids_bt[row, span] = torch.as_tensor(list(seq), dtype=torch.long)
        mask_bt[row, span] = 1
    return {"input_ids": ids_bt, "attention_mask": mask_bt}


def batched(items: Iterable[Any], batch_size: int) -> Iterator[list[Any]]:
    """Group an iterable into lists of `batch_size` (the last may be shorter)."""
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == batch_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def lm_batches(
    sequences: Iterable[list[int]], batch_size: int, pad_id: int, padding_side: str = "right"
) -> Iterator[dict[str, torch.Tensor]]:
    """Padded LM batches (`input_ids`, `attention_mask`) from token sequences."""
    for chunk in batched(sequences, batch_size):
        yield pad_batch(chunk, pad_id, padding_side)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def image_folder(root: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """List an image folder laid out as `root/CLASS_NAME/*.png` (classes in sorted order).

    Returns:
        (paths, labels, class names), labels indexing the class names.

    Raises:
        DataError: no class folders or no images.
    """
    base = Path(root)
    classes = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        for file in sorted((base / name).iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(file)
                labels.append(label)
    if not paths:
        raise DataError(f"{root}: no images found (expected {root}/CLASS_NAME/*.png)")
    return paths, labels, classes


def image_batches(root: str | Path, processor: Any, batch_size: int,
                  max_images: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of `pixel_values` and `labels` from an image folder, via an HF image processor.

    Raises:
        DataError: no images, an image file that cannot be decoded, or no image processor to
            turn them into tensors.
    """
    if processor is None:
        raise DataError("image data needs the model's image processor (none was found beside the model)")
    paths, labels, _ = image_folder(root)
    pairs = list(zip(paths, labels))[:max_images]
    for chunk in batched(pairs, batch_size):
        images = [_read_image(p) for p, _ in chunk]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        yield {"pixel_values": pixels, "labels": torch.tensor([label for _, label in chunk])}


def _read_image(path: Path) -> Any:
    """An image file as an RGB PIL image.

    Raises:
        DataError: a file PIL cannot decode (damaged, or not an image).
    """
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"{path}: not a readable image ({err})") from None


def default_pad_id(tokenizer: Any | None) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padding is always masked out)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path, *, overwrite: bool = False) -> Path:
    """Write dict rows as JSON lines.

    Args:
        rows: the rows.
        path: the output file (parent folders are created).
        overwrite: replace an existing file.

    Returns:
        The path written.

    Raises:
        FileExistsError: the file exists and `overwrite` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
