"""One evaluation of a model: recitation, guards, task probes and the stress test.

This is what `curvedit evaluate` runs; every part is optional and runs only when its
input is given (memorized windows, held-out text, a tasks directory, lm-eval tasks).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curvedit.errors import EvaluateError
from curvedit.evaluate.generation import check_vocabulary, context_window
from curvedit.evaluate.memorization import evaluate_recitation
from curvedit.windows import Window, default_pad_id, read_memorized
from curvedit.evaluate.perplexity import (
    NextTokenRankings, heldout_sequences, ndcg_at_k, next_token_rankings, perplexity)
from curvedit.evaluate.stress import StressOptions, stress_test
from curvedit.evaluate.tasks import TaskOptions, load_tasks, run_lm_eval, run_tasks
from curvedit.models import LoadedModel


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
        stress: the stress-test perturbations; None skips the stress test.
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
    stress: StressOptions | None = field(default_factory=StressOptions)
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


def reference_rankings(reference: LoadedModel, options: EvaluateOptions) -> NextTokenRankings:
    """The reference model's top-k next-token rankings on the held-out text (for nDCG).

    Compute them, free the reference, then load the model under test: only the
    rankings are needed later.

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


def _recitation(loaded: LoadedModel, sets: dict[str, list[Window]], options: EvaluateOptions, pad_id: int,
                metrics: dict[str, Any], details: list[dict[str, Any]]) -> None:
    metrics["recitation"] = {}
    for name, windows in sets.items():
        result, generated = evaluate_recitation(loaded.model, windows, pad_id=pad_id, batch_size=options.batch_size,
                                                loose_threshold=options.loose_threshold, progress=options.progress)
        metrics["recitation"][name] = result.summary()
        for index, (window, score, ids) in enumerate(zip(windows, result.examples, generated)):
            row = {"metric": "recitation", "set": name, "index": index, "source": window.source,
                   "document": window.document, "offset": window.offset, **dataclasses.asdict(score),
                   "generated_ids": ids}
            if loaded.preprocessor is not None:
                row["generated"] = loaded.preprocessor.decode(ids)
            details.append(row)


def evaluate_model(
    loaded: LoadedModel,
    options: EvaluateOptions,
    *,
    reference: LoadedModel | NextTokenRankings | None = None,
    reference_name: str | None = None,
    name: str | None = None,
) -> Evaluation:
    """Evaluate one model.

    Args:
        loaded: the model under test with its tokenizer.
        options: inputs and settings.
        reference: the reference model, or its precomputed rankings
            (`reference_rankings`), for nDCG; None skips nDCG.
        reference_name: how to name the reference in the config.
        name: the run's name in reports (default: the model's name).

    Returns:
        An `Evaluation`.

    Raises:
        EvaluateError: invalid options, or a reference without held-out text.
        curvedit.data.DataError: unreadable inputs.
        ImportError: lm-eval tasks requested and lm-eval not installed.
    """
    from curvedit import __version__  # noqa: PLC0415

    options.validate()
    if reference is not None and options.heldout is None:
        raise EvaluateError("nDCG against a reference needs held-out text (--heldout)")
    tokenizer = loaded.preprocessor
    pad_id = default_pad_id(tokenizer)
    sets = {Path(p).stem: read_memorized(p, tokenizer) for p in options.memorized}
    for path, windows in zip(options.memorized, sets.values()):
        check_vocabulary(loaded.model, [w.prefix_ids + w.suffix_ids for w in windows], f"memorized windows of {path}")
    tasks = load_tasks(options.tasks) if options.tasks is not None else []
    metrics: dict[str, Any] = {}
    details: list[dict[str, Any]] = []
    notes: list[str] = []
    if sets:
        _recitation(loaded, sets, options, pad_id, metrics, details)
    heldout = load_heldout(loaded, options) if options.heldout is not None else None
    if heldout is not None:
        ppl = perplexity(loaded.model, heldout, pad_id=pad_id, batch_size=options.batch_size)
        metrics["perplexity"] = {"perplexity": ppl.perplexity, "tokens": ppl.tokens, "sequences": ppl.sequences}
        if reference is not None:
            rankings = reference if isinstance(reference, NextTokenRankings) else reference_rankings(reference, options)
            ndcg = ndcg_at_k(loaded.model, heldout, rankings, pad_id=pad_id, batch_size=options.batch_size)
            metrics["ndcg"] = {f"ndcg@{ndcg.k}": ndcg.ndcg, "positions": ndcg.positions}
    if tasks:
        results = run_tasks(loaded.model, tokenizer, tasks, TaskOptions(options.batch_size, options.task_limit),
                            pad_id=pad_id)
        metrics["tasks"] = {r.name: {"accuracy": r.accuracy, "n": r.n} for r in results}
        details += [{"metric": "task", "task": r.name, **row} for r in results for row in r.details]
    if options.lm_eval_tasks:
        metrics["lm_eval"] = run_lm_eval(loaded.model, tokenizer, options.lm_eval_tasks, batch_size=options.batch_size,
                                         limit=options.lm_eval_limit, num_fewshot=options.lm_eval_fewshot,
                                         include_path=options.lm_eval_include)
    if sets and options.stress is not None:
        stress = options.stress
        if stress.left_extend and heldout is None:
            notes.append("stress test: left extension skipped (it takes its filler from --heldout text)")
            stress = dataclasses.replace(stress, left_extend=())
        filler = [t for seq in heldout for t in seq] if heldout is not None else []
        metrics["stress"] = {
            set_name: {r.key: r.summary() for r in stress_test(loaded.model, windows, stress, filler_ids=filler,
                                                              pad_id=pad_id)}
            for set_name, windows in sets.items()}
    config = {"name": name or loaded.name, "model": loaded.name, "reference": reference_name,
              "curvedit_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "options": _jsonable(options)}
    return Evaluation(config=config, metrics=metrics, details=details, notes=notes)

