"""One evaluation of a model: recitation, guards, task probes, the stress test and the
privacy metrics.

This is what `curvedit evaluate` runs; every part is optional and runs only when its
input is given (memorized windows, held-out text, a tasks directory, lm-eval tasks,
non-member text). Every rate carries a Wilson interval and every mean a bootstrap
interval (`*_ci` keys, each with its `n`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curvedit import __version__
from curvedit.data import DataError, default_pad_id
from curvedit.errors import EvaluateError
from curvedit.evaluate.generation import check_vocabulary
from curvedit.evaluate.intervals import wilson
from curvedit.evaluate.memorization import evaluate_recitation
from curvedit.evaluate.perplexity import (
    NDCG_DEFINITIONS,
    NDCG_GAINS,
    NextTokenRankings,
    heldout_sequences,
    ndcg_at_k,
    next_token_rankings,
    perplexity,
)
from curvedit.evaluate.privacy import PrivacyOptions, extraction_metrics, membership_inference, sequence_stats
from curvedit.evaluate.stress import ReferenceStressOptions, StressOptions, reference_stress_test, stress_test
from curvedit.evaluate.tasks import TaskOptions, load_tasks, run_lm_eval, run_tasks
from curvedit.evaluate.windows import Window, read_memorized
from curvedit.models import LoadedModel, context_window


@dataclass(frozen=True)
class EvaluateOptions:
    """What to evaluate and how.

    Attributes:
        memorized: memorized-window JSONL files (from `find-memorized`); each is one
            recitation set, named after its file stem.
        heldout: held-out corpus for perplexity, nDCG and stress-test filler.
        heldout_seq_len: held-out sequence length (capped at the context window).
        heldout_max_tokens: held-out token budget (None: the whole corpus).
        tasks: a tasks directory or file (see `curvedit.evaluate.tasks`).
        task_limit: at most this many items per task.
        lm_eval_tasks: lm-evaluation-harness task names.
        lm_eval_limit: documents per lm-eval task (None: all).
        lm_eval_fewshot: lm-eval few-shot count (None: task default).
        lm_eval_include: folder of custom lm-eval task YAML files.
        ndcg_k: depth of the nDCG ranking.
        ndcg_gain: "rank" (the paper's code) or "probability" relevance in nDCG.
        stress: `ReferenceStressOptions` (the paper's position perturbations) or
            `StressOptions` (filler extensions and shifts); None skips the stress test.
        mia: non-member corpus for membership inference against the memorized sets.
        mia_max_nonmembers: at most this many non-member windows.
        privacy: Min-K% k, sampled-extraction N and temperature.
        loose_threshold: loose accuracy counts 1 - d/L >= this.
        batch_size: sequences per forward pass / decoding batch.
        text_field: JSON field with text in the corpora.
        progress: show progress bars.
    """

    memorized: tuple[Path, ...] = ()
    heldout: Path | None = None
    heldout_seq_len: int = 512
    heldout_max_tokens: int | None = 100_000
    tasks: Path | None = None
    task_limit: int | None = None
    lm_eval_tasks: tuple[str, ...] = ()
    lm_eval_limit: float | None = None
    lm_eval_fewshot: int | None = None
    lm_eval_include: Path | None = None
    ndcg_k: int = 10
    ndcg_gain: str = "rank"
    stress: ReferenceStressOptions | StressOptions | None = field(default_factory=ReferenceStressOptions)
    mia: Path | None = None
    mia_max_nonmembers: int = 1000
    privacy: PrivacyOptions = field(default_factory=PrivacyOptions)
    loose_threshold: float = 0.75
    batch_size: int = 16
    text_field: str = "text"
    progress: bool = True

    def validate(self) -> None:
        """Raise EvaluateError for inconsistent options (duplicate set names, bad sizes, nothing to do)."""
        names = [Path(p).stem for p in self.memorized]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise EvaluateError(f"memorized sets must have distinct file names; repeated: {duplicates}")
        if self.batch_size < 1 or self.heldout_seq_len < 2 or self.ndcg_k < 1:
            raise EvaluateError("batch_size and ndcg_k must be >= 1 and heldout_seq_len >= 2")
        if not 0 < self.loose_threshold <= 1:
            raise EvaluateError(f"the loose threshold is a share of the suffix in (0, 1], got {self.loose_threshold}")
        if not (self.memorized or self.heldout or self.tasks or self.lm_eval_tasks):
            raise EvaluateError("nothing to evaluate: give memorized windows, held-out text, tasks or lm-eval tasks")
        if self.mia is not None and not self.memorized:
            raise EvaluateError("membership inference (--mia) compares memorized windows with non-members: "
                                "give --memorized too")
        if self.ndcg_gain not in NDCG_GAINS:
            raise EvaluateError(f"unknown nDCG gain {self.ndcg_gain!r}; choose one of {', '.join(NDCG_GAINS)}")
        if self.mia_max_nonmembers < 1:
            raise EvaluateError(f"mia_max_nonmembers must be at least 1, got {self.mia_max_nonmembers}")
        if self.stress is not None:
            self.stress.validate()
        self.privacy.validate()


@dataclass
class Evaluation:
    """The outcome of `evaluate_model`.

    Attributes:
        config: what was evaluated (model, reference, options, versions, time).
        metrics: nested metric values (see `curvedit.evaluate.results`).
        details: per-example rows (recitation, task items).
        notes: parts that were skipped, and why.
    """

    config: dict[str, Any]
    metrics: dict[str, Any]
    details: list[dict[str, Any]]
    notes: list[str]


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def load_heldout(loaded: LoadedModel, options: EvaluateOptions) -> list[list[int]]:
    """Tokenize the held-out corpus into sequences for this model.

    Args:
        loaded: the model and tokenizer.
        options: `heldout`, `heldout_seq_len` (capped at the context window) and
            `heldout_max_tokens`.

    Returns:
        The token sequences.

    Raises:
        EvaluateError: no held-out corpus in the options.
        curvedit.data.DataError: an empty corpus.
    """
    if options.heldout is None:
        raise EvaluateError("no held-out corpus given")
    limit = context_window(loaded.model)
    seq_len = min(options.heldout_seq_len, limit) if limit else options.heldout_seq_len
    return heldout_sequences(options.heldout, loaded.preprocessor, seq_len=seq_len,
                             max_tokens=options.heldout_max_tokens, text_field=options.text_field)


@dataclass
class ReferenceSide:
    """What an evaluation keeps of the reference model once it is freed.

    Attributes:
        rankings: its top-k next-token rankings on the held-out text (nDCG), or None.
        member_losses: per memorized set, its loss on each window (the `reference` MIA score).
        nonmember_losses: its loss on each non-member window, or None.
        vocabulary: its vocabulary's signature (`vocabulary_signature`), to refuse a model under
            test that reads token ids another way.
    """

    rankings: NextTokenRankings | None = None
    member_losses: dict[str, list[float]] = field(default_factory=dict)
    nonmember_losses: list[float] | None = None
    vocabulary: tuple[int | None, str | None] | None = None


def vocabulary_signature(loaded: LoadedModel) -> tuple[int | None, str | None]:
    """(number of output ids, SHA-256 of the tokenizer's token -> id map or None)."""
    head = loaded.model.get_output_embeddings() if hasattr(loaded.model, "get_output_embeddings") else None
    size = int(head.weight.shape[0]) if head is not None else None
    vocab = loaded.preprocessor.get_vocab() if hasattr(loaded.preprocessor, "get_vocab") else None
    digest = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest() if vocab else None
    return size, digest


def reference_rankings(reference: LoadedModel, options: EvaluateOptions) -> NextTokenRankings:
    """The reference model's top-k next-token rankings on the held-out text (for nDCG).

    Args:
        reference: the reference (unedited) model.
        options: held-out corpus, `ndcg_k`, `batch_size`.

    Returns:
        The rankings.

    Raises:
        EvaluateError: no held-out corpus in the options.
    """
    sequences = load_heldout(reference, options)
    return next_token_rankings(reference.model, sequences, k=options.ndcg_k,
                               pad_id=default_pad_id(reference.preprocessor), batch_size=options.batch_size)


def reference_side(reference: LoadedModel, options: EvaluateOptions) -> ReferenceSide:
    """Everything the evaluation needs from the reference model: rankings on the held-out
    text (when given) and losses on the memorized and non-member windows (with `mia`).
    Compute it, free the reference, then load the model under test.

    Raises:
        EvaluateError, DataError: unreadable or empty inputs.
    """
    side = ReferenceSide(rankings=reference_rankings(reference, options) if options.heldout is not None else None,
                         vocabulary=vocabulary_signature(reference))
    if options.mia is not None:
        sets = _memorized_sets(reference, options)
        pad_id = default_pad_id(reference.preprocessor)

        def losses(sequences: list[list[int]]) -> list[float]:
            return [s.loss for s in sequence_stats(reference.model, sequences, pad_id=pad_id,
                                                   batch_size=options.batch_size)]

        side.member_losses = {name: losses(_window_ids(windows)) for name, windows in sets.items()}
        side.nonmember_losses = losses(load_nonmembers(reference, options, sets))
    return side


def _memorized_sets(loaded: LoadedModel, options: EvaluateOptions) -> dict[str, list[Window]]:
    sets = {Path(p).stem: read_memorized(p, loaded.preprocessor) for p in options.memorized}
    for path, windows in zip(options.memorized, sets.values()):
        check_vocabulary(loaded.model, _window_ids(windows), f"memorized windows of {path}")
    return sets


def _window_ids(windows: list[Window]) -> list[list[int]]:
    return [w.prefix_ids + w.suffix_ids for w in windows]


def load_nonmembers(loaded: LoadedModel, options: EvaluateOptions, sets: dict[str, list[Window]]) -> list[list[int]]:
    """Non-member windows: the `mia` corpus cut into windows as long as the memorized ones
    (the most common prefix + suffix length), at most `mia_max_nonmembers`.

    Raises:
        EvaluateError: no `mia` corpus.
        DataError: a corpus too short for one window.
    """
    if options.mia is None:
        raise EvaluateError("no non-member corpus given")
    length = Counter(len(ids) for windows in sets.values() for ids in _window_ids(windows)).most_common(1)[0][0]
    chunks = [s for s in heldout_sequences(options.mia, loaded.preprocessor, seq_len=length, max_tokens=None,
                                           text_field=options.text_field) if len(s) == length]
    if not chunks:
        raise DataError(f"{options.mia}: the non-member corpus holds no window of {length} tokens "
                        "(the length of the memorized windows)")
    check_vocabulary(loaded.model, chunks, f"non-member windows of {options.mia}")
    members = {tuple(ids) for windows in sets.values() for ids in _window_ids(windows)}
    shared = sum(tuple(c) in members for c in chunks)
    if shared:
        raise DataError(f"{options.mia}: {shared} of its {len(chunks)} non-member windows are memorized windows "
                        "themselves; give text the model was not trained on")
    return chunks[: options.mia_max_nonmembers]


def _text(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))


def _recitation(loaded: LoadedModel, sets: dict[str, list[Window]], options: EvaluateOptions, pad_id: int,
                metrics: dict[str, Any], details: list[dict[str, Any]]) -> None:
    metrics["recitation"] = {}
    for name, windows in sets.items():
        result, generated = evaluate_recitation(loaded.model, windows, pad_id=pad_id, batch_size=options.batch_size,
                                                loose_threshold=options.loose_threshold, progress=options.progress)
        ci = result.intervals()
        metrics["recitation"][name] = result.summary() | {
            "strict_ci": ci["strict"], "loose_ci": ci["loose"], "avg_normalized_distance_ci": ci["distance"]}
        for index, (window, score, ids) in enumerate(zip(windows, result.examples, generated)):
            row = {"metric": "recitation", "set": name, "index": index, "source": window.source,
                   "document": window.document, "offset": window.offset, **dataclasses.asdict(score),
                   "generated_ids": ids}
            if loaded.preprocessor is not None:
                row["generated"] = loaded.preprocessor.decode(ids)
            details.append(row)


def _privacy(loaded: LoadedModel, sets: dict[str, list[Window]], options: EvaluateOptions, pad_id: int,
             side: ReferenceSide | None, metrics: dict[str, Any], details: list[dict[str, Any]]) -> None:
    """Exact memorization, extraction strength, sampled extraction and (with `mia`) the MIA AUROCs."""
    privacy = options.privacy
    temperature = privacy.temperature if privacy.samples > 0 else None

    def stats(sequences: list[list[int]]) -> list[Any]:
        return sequence_stats(loaded.model, sequences, pad_id=pad_id, batch_size=options.batch_size,
                              temperature=temperature)

    nonmembers = load_nonmembers(loaded, options, sets) if options.mia is not None else None
    nonmember_stats = stats(nonmembers) if nonmembers is not None else None
    tokenizer = loaded.preprocessor
    metrics["extraction"], mia = {}, {}
    for name, windows in sets.items():
        ids = _window_ids(windows)
        member_stats = stats(ids)
        extraction = extraction_metrics(member_stats, [len(w.suffix_ids) for w in windows], privacy.samples)
        per_window = extraction.pop("per_window")
        metrics["extraction"][name] = extraction
        details += [{"metric": "extraction", "set": name, "index": index,
                     **{key: values[index] for key, values in per_window.items()}} for index in range(len(windows))]
        if nonmembers is not None:
            reference = None
            if side is not None and side.nonmember_losses is not None and name in side.member_losses:
                reference = (side.member_losses[name], side.nonmember_losses)
            mia[name] = membership_inference(member_stats, nonmember_stats, [_text(tokenizer, i) for i in ids],
                                             [_text(tokenizer, i) for i in nonmembers], privacy.k_percent, reference)
    if mia:
        metrics["mia"] = mia


def evaluate_model(
    loaded: LoadedModel,
    options: EvaluateOptions,
    *,
    reference: LoadedModel | NextTokenRankings | ReferenceSide | None = None,
    reference_name: str | None = None,
    name: str | None = None,
) -> Evaluation:
    """Evaluate one model.

    Args:
        loaded: the model under test with its tokenizer.
        options: inputs and settings.
        reference: the reference model, or what `reference_side` kept of it (or only its
            rankings), for nDCG and the reference MIA score; None skips both.
        reference_name: how to name the reference in the config.
        name: the run's name in reports (default: the model's name).

    Returns:
        An `Evaluation`.

    Raises:
        EvaluateError: invalid options, a reference with neither held-out text nor `mia`, or a
            reference with another vocabulary than the model under test.
        curvedit.data.DataError: unreadable inputs.
        ImportError: lm-eval tasks requested and lm-eval not installed.
    """
    options.validate()
    if reference is not None and options.heldout is None and options.mia is None:
        raise EvaluateError("a reference is used for nDCG (needs held-out text, --heldout) and for the reference "
                            "MIA score (needs non-member text, --mia); give one of them")
    if isinstance(reference, LoadedModel):
        reference = reference_side(reference, options)
    elif isinstance(reference, NextTokenRankings):
        reference = ReferenceSide(rankings=reference)
    if reference is not None and reference.vocabulary is not None and reference.vocabulary != (
            mine := vocabulary_signature(loaded)):
        what = "output vocabulary size" if reference.vocabulary[0] != mine[0] else "tokenizer"
        raise EvaluateError(f"the reference model has another {what} than the model under test "
                            f"({reference.vocabulary[0]} vs {mine[0]} ids): nDCG and reference losses would compare "
                            "different tokens; give the unedited model of this one as --reference")
    tokenizer = loaded.preprocessor
    pad_id = default_pad_id(tokenizer)
    sets = _memorized_sets(loaded, options)
    tasks = load_tasks(options.tasks) if options.tasks is not None else []
    metrics: dict[str, Any] = {}
    details: list[dict[str, Any]] = []
    notes: list[str] = []
    if sets:
        _recitation(loaded, sets, options, pad_id, metrics, details)
        _privacy(loaded, sets, options, pad_id, reference, metrics, details)
    heldout = load_heldout(loaded, options) if options.heldout is not None else None
    if heldout is not None:
        ppl = perplexity(loaded.model, heldout, pad_id=pad_id, batch_size=options.batch_size)
        metrics["perplexity"] = {"perplexity": ppl.perplexity, "tokens": ppl.tokens, "sequences": ppl.sequences,
                                 "perplexity_ci": ppl.interval().to_dict()}
        if reference is not None and reference.rankings is not None:
            ndcg = ndcg_at_k(loaded.model, heldout, reference.rankings, pad_id=pad_id, batch_size=options.batch_size,
                             gain=options.ndcg_gain)
            metrics["ndcg"] = {f"ndcg@{ndcg.k}": ndcg.ndcg, "positions": ndcg.positions, "gain": ndcg.gain,
                               "definition": NDCG_DEFINITIONS[ndcg.gain],
                               f"ndcg@{ndcg.k}_ci": ndcg.interval().to_dict()}
    if tasks:
        results = run_tasks(loaded.model, tokenizer, tasks, TaskOptions(options.batch_size, options.task_limit),
                            pad_id=pad_id)
        metrics["tasks"] = {r.name: {"accuracy": r.accuracy, "n": r.n,
                                     "accuracy_ci": wilson(round(r.accuracy * r.n), r.n).to_dict()}
                            for r in results}
        details += [{"metric": "task", "task": r.name, **row} for r in results for row in r.details]
    if options.lm_eval_tasks:
        metrics["lm_eval"] = run_lm_eval(loaded.model, tokenizer, options.lm_eval_tasks, batch_size=options.batch_size,
                                         limit=options.lm_eval_limit, num_fewshot=options.lm_eval_fewshot,
                                         include_path=options.lm_eval_include)
    if sets and options.stress is not None:
        metrics["stress"] = _stress(loaded, sets, options, heldout, pad_id, notes)
    config = {"name": name or loaded.name, "model": loaded.name, "reference": reference_name,
              "curvedit_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "stress_test": None if options.stress is None else (
                  "reference" if isinstance(options.stress, ReferenceStressOptions) else "filler"),
              "options": _jsonable(options)}
    return Evaluation(config=config, metrics=metrics, details=details, notes=notes)


def _stress(loaded: LoadedModel, sets: dict[str, list[Window]], options: EvaluateOptions,
            heldout: list[list[int]] | None, pad_id: int, notes: list[str]) -> dict[str, Any]:
    stress = options.stress
    if isinstance(stress, ReferenceStressOptions):
        return {set_name: {"reference": reference_stress_test(loaded.model, windows, stress, pad_id=pad_id).summary()}
                for set_name, windows in sets.items()}
    if stress.left_extend and heldout is None:
        notes.append("stress test: left extension skipped (it takes its filler from --heldout text)")
        stress = dataclasses.replace(stress, left_extend=())
    filler = [t for seq in heldout for t in seq] if heldout is not None else []
    return {set_name: {r.key: r.summary() for r in stress_test(loaded.model, windows, stress, filler_ids=filler,
                                                               pad_id=pad_id)}
            for set_name, windows in sets.items()}
