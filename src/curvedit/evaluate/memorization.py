"""Finding memorized windows in a corpus and scoring how well a model recites them.

A window is a prefix P (default 64 tokens) followed by a suffix S (default 48 tokens)
of one document. It is *memorized* when greedy decoding of |S| tokens from P gives S
exactly (docs/method.md sections 4-7).

Recitation metrics, with d the token-level Levenshtein distance between the generated
and the true suffix and L = |S|:

- strict accuracy: mean of 1[d = 0];
- loose accuracy: mean of 1[1 - d/L >= 0.75] (the threshold is an option);
- average normalized distance: mean of d/L (higher = less memorization).
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

import numpy as np
import torch
from rapidfuzz.distance import Levenshtein

from curvedit.data import DataError, Record, batched, default_pad_id, pad_batch, read_records
from curvedit.distributed import current_context, map_batches
from curvedit.errors import EvaluateError
from curvedit.evaluate.generation import check_fits_context, greedy_generate, kept_logits
from curvedit.evaluate.intervals import bootstrap_mean, wilson
from curvedit.evaluate.windows import Window
from curvedit.models import model_device


@dataclass(frozen=True)
class FoundWindow:
    """A window after greedy decoding.

    Attributes:
        window: the window.
        generated_ids: the |S| greedily decoded tokens.
        match: per suffix position, whether the generated token equals the true one.
        memorized: all positions match.
    """

    window: Window
    generated_ids: list[int]
    match: list[bool]
    memorized: bool


@dataclass(frozen=True)
class FindOptions:
    """How `find_memorized` cuts and screens windows.

    Attributes:
        prefix_len: prefix tokens P (windows mode; ignored in quotes mode).
        suffix_len: suffix tokens S; in quotes mode the last S tokens of each text.
        mode: "windows" slides P+S windows over each document; "quotes" takes one
            window per document: its last `suffix_len` tokens are the suffix and all
            tokens before them the prefix (meant for short texts such as quotes).
        stride: token step between window starts (windows mode); None = P + S
            (non-overlapping windows).
        sample: draw this many windows uniformly at random (reservoir sampling over the
            whole corpus, seeded) instead of taking them in corpus order.
        max_windows: examine at most this many windows (in corpus order).
        max_memorized: stop once this many memorized windows are kept.
        dedup_threshold: drop a memorized window whose token n-gram Jaccard similarity
            to an already kept one is >= this (None: keep all).
        dedup_ngram: n of those n-grams.
        batch_size: windows per forward pass / decoding batch.
        keep_all: decode every window and return all of them (memorized or not) with
            their match lists; otherwise only memorized windows are returned and a
            teacher-forced pre-filter skips decoding the others.
        seed: seed of the sampling.
        text_field: JSON field with the text.
        progress: show a tqdm progress bar.
    """

    prefix_len: int = 64
    suffix_len: int = 48
    mode: Literal["windows", "quotes"] = "windows"
    stride: int | None = None
    sample: int | None = None
    max_windows: int | None = None
    max_memorized: int | None = None
    dedup_threshold: float | None = None
    dedup_ngram: int = 8
    batch_size: int = 32
    keep_all: bool = False
    seed: int = 0
    text_field: str = "text"
    progress: bool = True

    def validate(self) -> None:
        """Raise EvaluateError for an option outside its range."""
        if self.mode not in ("windows", "quotes"):
            raise EvaluateError(f"mode must be 'windows' or 'quotes', got {self.mode!r}")
        if self.suffix_len < 1 or (self.mode == "windows" and self.prefix_len < 1):
            raise EvaluateError(f"prefix and suffix need at least 1 token, got {self.prefix_len} and {self.suffix_len}")
        for name in ("stride", "sample", "max_windows", "max_memorized", "dedup_ngram", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise EvaluateError(f"{name} must be at least 1, got {value}")
        if self.dedup_threshold is not None and not 0.0 < self.dedup_threshold <= 1.0:
            raise EvaluateError(f"dedup_threshold must be in (0, 1], got {self.dedup_threshold}")


@dataclass
class FindResult:
    """What `find_memorized` found.

    Attributes:
        found: the kept windows (memorized ones only unless `keep_all`), in corpus order
            of examination.
        windows: windows examined.
        prefiltered: windows that passed the teacher-forced pre-filter (all windows
            with `keep_all`, which skips it).
        memorized: memorized windows before near-duplicate removal.
        duplicates: memorized windows dropped as near duplicates.
    """

    found: list[FoundWindow] = field(default_factory=list)
    windows: int = 0
    prefiltered: int = 0
    memorized: int = 0
    duplicates: int = 0


def _tokenize(record: Record, tokenizer: Any | None) -> list[int]:
    if record.input_ids is not None:
        return record.input_ids
    if tokenizer is None:
        raise DataError(f"{record.source}: text rows need a tokenizer (the model has none; give input_ids)")
    return tokenizer(record.text, add_special_tokens=False)["input_ids"]


def iter_windows(
    records: Iterable[Record], tokenizer: Any | None, options: FindOptions
) -> Iterator[Window]:
    """Cut windows from documents, in corpus order.

    Args:
        records: documents (text rows are tokenized without special tokens).
        tokenizer: an HF tokenizer, needed for text rows.
        options: lengths, mode and stride.

    Returns:
        An iterator of `Window`; documents too short for one window give none.

    Raises:
        DataError: a text row and no tokenizer.
    """
    span = options.prefix_len + options.suffix_len
    stride = options.stride or span
    for record in records:
        ids = _tokenize(record, tokenizer)
        if options.mode == "quotes":
            if len(ids) > options.suffix_len:
                cut = len(ids) - options.suffix_len
                yield Window(ids[:cut], ids[cut:], record.source, record.index, 0)
            continue
        for offset in range(0, len(ids) - span + 1, stride):
            yield Window(ids[offset : offset + options.prefix_len], ids[offset + options.prefix_len : offset + span],
                         record.source, record.index, offset)


def _reservoir(items: Iterable[Window], size: int, seed: int) -> list[Window]:
    """A uniform sample of `size` items (all of them when fewer), in stream order."""
    rng = random.Random(seed)
    kept: list[tuple[int, Window]] = []
    for seen, item in enumerate(items):
        if seen < size:
            kept.append((seen, item))
        else:
            slot = rng.randint(0, seen)
            if slot < size:
                kept[slot] = (seen, item)
    return [item for _, item in sorted(kept, key=lambda pair: pair[0])]


@torch.inference_mode()
def teacher_forced_match(model: torch.nn.Module, windows: Sequence[Window], pad_id: int = 0) -> torch.Tensor:
    """Whether the arg-max prediction equals the true token at every suffix position.

    One forward pass over prefix + suffix (left padded, so every suffix ends at the
    last column); logits are computed only at the positions that predict the suffix
    (see `kept_logits`).

    Args:
        model: an HF causal LM.
        windows: windows whose suffixes all have the same length.
        pad_id: padding id.

    Returns:
        bool (B, S): per window and suffix position, arg-max == true token.

    Raises:
        EvaluateError: windows with different suffix lengths.
    """
    suffix_len = len(windows[0].suffix_ids)
    if any(len(w.suffix_ids) != suffix_len for w in windows):
        raise EvaluateError("teacher_forced_match needs windows with equal suffix lengths")
    batch = pad_batch([w.prefix_ids + w.suffix_ids for w in windows], pad_id, padding_side="left")
    device = model_device(model)
    ids = batch["input_ids"].to(device)
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[:, -suffix_len - 1 : -1] = True
    predicted = torch.cat([logits.argmax(dim=-1)
                           for _, logits in kept_logits(model, ids, batch["attention_mask"].to(device), keep)])
    return predicted.view(len(windows), suffix_len) == ids[:, -suffix_len:]


class NearDuplicateFilter:
    """Admit token sequences unless one admitted before is too similar.

    Similarity is the Jaccard index of the two sets of token n-grams (a sequence
    shorter than n is one n-gram). An inverted index from n-gram to admitted sequences
    makes each check cost the number of shared n-grams, not the number admitted.
    """

    def __init__(self, threshold: float, n: int = 8) -> None:
        """Args: threshold: reject at Jaccard >= threshold. n: n-gram length."""
        self.threshold = threshold
        self.n = n
        self._index: dict[tuple[int, ...], list[int]] = {}
        self._sizes: list[int] = []

    def _ngrams(self, ids: Sequence[int]) -> set[tuple[int, ...]]:
        ids = tuple(ids)
        if len(ids) <= self.n:
            return {ids}
        return {ids[i : i + self.n] for i in range(len(ids) - self.n + 1)}

    def admit(self, ids: Sequence[int]) -> bool:
        """Admit `ids` (and remember it) unless it is a near duplicate of an admitted sequence.

        Args:
            ids: the token sequence.

        Returns:
            True when admitted.
        """
        grams = self._ngrams(ids)
        shared = Counter(j for gram in grams for j in self._index.get(gram, ()))
        for j, common in shared.items():
            if common / (len(grams) + self._sizes[j] - common) >= self.threshold:
                return False
        key = len(self._sizes)
        self._sizes.append(len(grams))
        for gram in grams:
            self._index.setdefault(gram, []).append(key)
        return True


def find_memorized(
    model: torch.nn.Module,
    tokenizer: Any | None,
    corpus: str | Path | Iterable[Record],
    options: FindOptions | None = None,
    *,
    pad_id: int | None = None,
) -> FindResult:
    """Find the windows of a corpus that the model recites verbatim under greedy decoding.

    Each batch of windows first goes through one teacher-forced forward pass; only the
    windows whose arg-max equals the true token at every suffix position are decoded
    greedily (batched, KV cache) to confirm. (Both tests agree in exact arithmetic;
    the decode guards against numerical differences between the two passes.) The
    candidates of successive batches are pooled until they fill a decoding batch, so
    that rare memorized windows do not each cost |S| decoding steps.

    Args:
        model: an HF causal LM in eval mode.
        tokenizer: its tokenizer; may be None when every row gives `input_ids`.
        corpus: a source for `curvedit.data.read_records` or an iterable of `Record`.
        options: window lengths, sampling, de-duplication (defaults: `FindOptions()`).
        pad_id: padding id (default: the tokenizer's pad or EOS id, else 0).

    Returns:
        A `FindResult`.

    Raises:
        DataError: an empty corpus, one without any window long enough, or a text row
            without a tokenizer.
        EvaluateError: invalid options, or a window longer than the model's context window.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415 - keep imports light

    options = options or FindOptions()
    options.validate()
    if options.mode == "windows":
        check_fits_context(model, options.prefix_len + options.suffix_len,
                           f"prefix + suffix ({options.prefix_len} + {options.suffix_len})")
    pad_id = default_pad_id(tokenizer) if pad_id is None else pad_id
    records = read_records(corpus, text_field=options.text_field) if isinstance(corpus, (str, Path)) else corpus
    stats = {"documents": 0}

    def counted(items: Iterable[Record]) -> Iterator[Record]:
        for item in items:
            stats["documents"] += 1
            yield item

    windows: Iterable[Window] = iter_windows(counted(records), tokenizer, options)
    if options.sample is not None:
        windows = _reservoir(windows, options.sample, options.seed)
    elif options.max_windows is not None:
        windows = itertools.islice(windows, options.max_windows)
    dedup = NearDuplicateFilter(options.dedup_threshold, options.dedup_ngram) if options.dedup_threshold else None
    result = FindResult()
    bar = tqdm(total=len(windows) if isinstance(windows, list) else None, unit="window",
               desc="find-memorized", disable=not options.progress)
    world = current_context().world_size
    pending: list[tuple[list[Window], list[bool]]] = []  # screened batches whose candidates await decoding
    for round_chunks in batched(batched(windows, options.batch_size), world):  # one batch per rank
        if options.mode == "quotes":
            for window in itertools.chain.from_iterable(round_chunks):
                check_fits_context(model, len(window.prefix_ids) + len(window.suffix_ids),
                                   f"{window.source} row {window.document}: prefix + suffix")
        passed = map_batches(round_chunks, 1, lambda one: [_prefilter(model, one[0], options, pad_id)])
        pending += zip(round_chunks, passed)
        if sum(sum(flags) for _, flags in pending) >= _decode_at(result, options, world):
            settled, pending = pending, []
            if _settle(model, result, settled, dedup, options, pad_id, bar):
                break
    if pending:
        _settle(model, result, pending, dedup, options, pad_id, bar)
    bar.close()
    if result.windows == 0:
        raise DataError(_no_window_message(corpus, stats["documents"], options))
    if options.max_memorized is not None:
        _truncate_memorized(result, options.max_memorized)
    return result


def _prefilter(model: torch.nn.Module, chunk: list[Window], options: FindOptions, pad_id: int) -> list[bool]:
    """Per window of a batch, whether it is a candidate to decode: passes the teacher-forced
    pre-filter, or every window with `keep_all`."""
    if options.keep_all:
        return [True] * len(chunk)
    return teacher_forced_match(model, chunk, pad_id).all(dim=1).tolist()


def _decode_at(result: FindResult, options: FindOptions, world: int) -> int:
    """How many pending candidates to gather before decoding them: a full decoding batch
    per rank, or fewer when that many memorized windows would reach `max_memorized`
    (so no batch is screened past the one where the search stops)."""
    full = options.batch_size * world
    if options.max_memorized is None:
        return full
    return min(full, options.max_memorized - (result.memorized - result.duplicates))


def _settle(model: torch.nn.Module, result: FindResult, pending: list[tuple[list[Window], list[bool]]],
            dedup: NearDuplicateFilter | None, options: FindOptions, pad_id: int, bar: Any) -> bool:
    """Decode the candidates of screened batches together, then add the batches to the
    result in corpus order (near-duplicate removal is order-dependent).

    Candidates are pooled across batches because memorized windows are rare: a batch
    with one candidate would otherwise pay |S| decoding steps for it alone.

    Returns:
        True once `max_memorized` windows are kept (later batches are then not counted,
        as if they had not been examined).
    """
    candidates = [w for chunk, passed in pending for w, ok in zip(chunk, passed) if ok]
    decoded = iter(_decode(model, candidates, options, pad_id))
    for chunk, passed in pending:
        result.windows += len(chunk)
        result.prefiltered += sum(passed)
        for found in itertools.islice(decoded, sum(passed)):
            if found.memorized:
                result.memorized += 1
                if dedup is not None and not dedup.admit(found.window.prefix_ids + found.window.suffix_ids):
                    result.duplicates += 1
                    continue
            if found.memorized or options.keep_all:
                result.found.append(found)
        bar.update(len(chunk))
        bar.set_postfix(memorized=result.memorized - result.duplicates)
        if options.max_memorized is not None and result.memorized - result.duplicates >= options.max_memorized:
            return True
    return False


def _no_window_message(corpus: Any, documents: int, options: FindOptions) -> str:
    name = corpus if isinstance(corpus, (str, Path)) else "the corpus"
    if documents == 0:
        return f"{name}: the corpus is empty (no documents)"
    need = (f"more than {options.suffix_len} tokens" if options.mode == "quotes"
            else f"at least {options.prefix_len + options.suffix_len} tokens (prefix + suffix)")
    return f"{name}: none of its {documents} documents has {need}"


def _truncate_memorized(result: FindResult, limit: int) -> None:
    """Keep only the first `limit` memorized windows (non-memorized ones before the cut stay)."""
    kept, count = [], 0
    for found in result.found:
        if found.memorized:
            if count == limit:
                break
            count += 1
        kept.append(found)
    result.found = kept


def _decode(model: torch.nn.Module, windows: Sequence[Window], options: FindOptions, pad_id: int) -> list[FoundWindow]:
    if not windows:
        return []
    generated = greedy_generate(model, [w.prefix_ids for w in windows], options.suffix_len,
                                pad_id=pad_id, batch_size=options.batch_size)
    match = torch.as_tensor(generated) == torch.as_tensor([w.suffix_ids for w in windows])
    return [FoundWindow(window=w, generated_ids=g, match=m, memorized=all(m))
            for w, g, m in zip(windows, generated, match.tolist())]


def _decode_text(tokenizer: Any | None, ids: Sequence[int]) -> str | None:
    return tokenizer.decode(list(ids)) if tokenizer is not None else None


def found_to_row(found: FoundWindow, tokenizer: Any | None = None) -> dict[str, Any]:
    """The JSON row of a found window (text fields only when a tokenizer is given).

    Args:
        found: the window and its decode.
        tokenizer: decodes `prefix`, `suffix` and `generated` text.

    Returns:
        A dict with prefix_ids, suffix_ids, prefix, suffix, source, document, offset,
        memorized, match, generated_ids (and generated text).
    """
    window = found.window
    row: dict[str, Any] = asdict(window)
    row.update(memorized=found.memorized, match=found.match, generated_ids=found.generated_ids)
    if tokenizer is not None:
        row.update(prefix=_decode_text(tokenizer, window.prefix_ids), suffix=_decode_text(tokenizer, window.suffix_ids),
                   generated=_decode_text(tokenizer, found.generated_ids))
    return row


@dataclass(frozen=True)
class RecitationScore:
    """The recitation score of one example.

    Attributes:
        distance: token-level Levenshtein distance d between generated and true suffix.
        length: L, the true suffix length.
        normalized_distance: d / L.
        strict: d == 0.
        loose: 1 - d/L >= the loose threshold.
        prefix_match: length of the longest common prefix of generated and true suffix.
    """

    distance: int
    length: int
    normalized_distance: float
    strict: bool
    loose: bool
    prefix_match: int


@dataclass(frozen=True)
class RecitationResult:
    """Recitation metrics over a set of examples.

    Attributes:
        n: number of examples.
        strict: strict accuracy (share of exact recitations).
        loose: loose accuracy (share with 1 - d/L >= threshold).
        avg_normalized_distance: mean of d / L.
        loose_threshold: the threshold used.
        examples: per-example scores, in input order.
    """

    n: int
    strict: float
    loose: float
    avg_normalized_distance: float
    loose_threshold: float
    examples: list[RecitationScore]

    def summary(self) -> dict[str, float | int]:
        """The aggregate metrics as a JSON-ready dict."""
        return {"n": self.n, "strict": self.strict, "loose": self.loose,
                "avg_normalized_distance": self.avg_normalized_distance, "loose_threshold": self.loose_threshold}

    def intervals(self) -> dict[str, dict[str, float | int | str]]:
        """95% intervals, JSON-ready: `strict` and `loose` (Wilson), `distance` (bootstrap
        over the examples' normalized distances)."""
        return {"strict": wilson(sum(e.strict for e in self.examples), self.n).to_dict(),
                "loose": wilson(sum(e.loose for e in self.examples), self.n).to_dict(),
                "distance": bootstrap_mean([e.normalized_distance for e in self.examples]).to_dict()}


def longest_prefix_match(generated: Sequence[int], target: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences.

    Args:
        generated: the decoded tokens.
        target: the true continuation.

    Returns:
        The number of leading positions where both agree.
    """
    width = min(len(generated), len(target))
    if width == 0:
        return 0
    differ = np.asarray(generated[:width]) != np.asarray(target[:width])
    return int(differ.argmax()) if differ.any() else width


def recitation_metrics(
    generated: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], *, loose_threshold: float = 0.75
) -> RecitationResult:
    """Strict/loose accuracy and average normalized Levenshtein distance.

    Args:
        generated: per example, the decoded tokens (any length; an empty list is a
            generation that produced nothing: d = L).
        targets: per example, the true suffix (non-empty).
        loose_threshold: loose accuracy counts 1 - d/L >= this.

    Returns:
        A `RecitationResult`.

    Raises:
        EvaluateError: different numbers of generations and targets, no example, or an
            empty target.
    """
    if len(generated) != len(targets):
        raise EvaluateError(f"{len(generated)} generations for {len(targets)} targets")
    if not targets:
        raise EvaluateError("recitation metrics need at least one example")
    scores = []
    for index, (gen, target) in enumerate(zip(generated, targets)):
        if not target:
            raise EvaluateError(f"example {index}: the true suffix is empty")
        distance = Levenshtein.distance(list(gen), list(target))
        normalized = distance / len(target)
        scores.append(RecitationScore(distance=distance, length=len(target), normalized_distance=normalized,
                                      strict=distance == 0, loose=1.0 - normalized >= loose_threshold,
                                      prefix_match=longest_prefix_match(gen, target)))
    n = len(scores)
    return RecitationResult(
        n=n, strict=sum(s.strict for s in scores) / n, loose=sum(s.loose for s in scores) / n,
        avg_normalized_distance=float(np.mean([s.normalized_distance for s in scores])),
        loose_threshold=loose_threshold, examples=scores)


def evaluate_recitation(
    model: torch.nn.Module,
    windows: Sequence[Window],
    *,
    pad_id: int = 0,
    batch_size: int = 32,
    loose_threshold: float = 0.75,
    progress: bool = False,
) -> tuple[RecitationResult, list[list[int]]]:
    """Greedy-decode |S| tokens from each prefix and score them against the suffix.

    Args:
        model: an HF causal LM in eval mode.
        windows: the prefix/suffix pairs (suffix lengths may differ).
        pad_id: padding id.
        batch_size: prompts per decoding batch.
        loose_threshold: see `recitation_metrics`.
        progress: show a tqdm progress bar.

    Returns:
        The metrics and, per window, the generated tokens (exactly |S| of them).

    Raises:
        EvaluateError: no window, or a prefix + suffix longer than the context window.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    if not windows:
        raise EvaluateError("recitation needs at least one prefix/suffix pair")
    for w in windows:
        check_fits_context(model, len(w.prefix_ids) + len(w.suffix_ids),
                           f"{w.source} row {w.document} offset {w.offset}: prefix + suffix")
    by_length: dict[int, list[int]] = {}
    for index, w in enumerate(windows):
        by_length.setdefault(len(w.suffix_ids), []).append(index)
    generated: list[list[int]] = [[] for _ in windows]
    with tqdm(total=len(windows), unit="example", desc="recitation", disable=not progress) as bar:
        for suffix_len, indices in sorted(by_length.items()):
            outputs = greedy_generate(model, [windows[i].prefix_ids for i in indices], suffix_len,
                                      pad_id=pad_id, batch_size=batch_size, progress=bar)
            for i, out in zip(indices, outputs):
                generated[i] = out
    return recitation_metrics(generated, [w.suffix_ids for w in windows], loose_threshold=loose_threshold), generated
