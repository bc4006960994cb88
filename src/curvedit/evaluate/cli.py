"""The `find-memorized`, `evaluate` and `report` commands."""

from __future__ import annotations

import contextlib
import gc
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, List, Optional

import typer

from curvedit.data import DataError
from curvedit.distributed import DistContext, DistributedError, destroy, init_from_env

if TYPE_CHECKING:
    from curvedit.evaluate.runner import EvaluateOptions, Evaluation
    from curvedit.evaluate.stress import StressOptions


def _fail(message: str) -> None:
    """Print a clear error and exit with status 2 (`curvedit.cli.fail`, imported late:
    `curvedit.cli` imports this module)."""
    from curvedit.cli import fail  # noqa: PLC0415

    fail(message)


def _refuse_existing(paths: list[Path], overwrite: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        _fail(f"{', '.join(existing)} already exist(s); pass --overwrite to replace")


@contextlib.contextmanager
def _process_group(device: str) -> Iterator[tuple[DistContext, str]]:
    """The torchrun process group (if launched by torchrun) for the command's duration:
    (this rank's context, the device it must use)."""
    try:
        ctx, device = init_from_env(device)
    except DistributedError as err:
        _fail(str(err))
    try:
        yield ctx, device  # no barrier at the end: only rank 0 writes, and no rank reads it
    finally:
        destroy()


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None


def find_memorized_command(
    model: str = typer.Option(..., "--model", help="Model name or directory."),
    data: str = typer.Option(..., "--data", help="Corpus: .jsonl/.txt file, folder, or datasets name."),
    out: Path = typer.Option(..., "--out", help="Output JSONL of memorized windows."),
    prefix: int = typer.Option(64, help="Prefix tokens (windows mode)."),
    suffix: int = typer.Option(48, help="Suffix tokens (quotes mode: the last SUFFIX tokens of each text)."),
    mode: str = typer.Option("windows", help="'windows' (slide over documents) or 'quotes' (one per short text)."),
    stride: Optional[int] = typer.Option(None, help="Tokens between window starts (default: prefix + suffix)."),
    sample: Optional[int] = typer.Option(None, help="Sample this many windows uniformly (seeded)."),
    max_windows: Optional[int] = typer.Option(None, help="Examine at most this many windows."),
    max_memorized: Optional[int] = typer.Option(None, help="Stop after this many memorized windows."),
    dedup: Optional[float] = typer.Option(None, help="Drop near duplicates: n-gram Jaccard >= this."),
    dedup_ngram: int = typer.Option(8, help="n of the de-duplication n-grams."),
    keep_all: bool = typer.Option(False, help="Write every window with its match list, memorized or not."),
    batch_size: int = typer.Option(32, help="Windows per batch."),
    seed: int = typer.Option(0, help="Sampling seed."),
    text_field: str = typer.Option("text", help="JSON field with the text."),
    device: str = typer.Option("cpu", help="Device."),
    dtype: Optional[str] = typer.Option(None, help="Weight dtype (bf16, fp16, float32)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output file."),
) -> None:
    """Find the windows of a corpus that the model recites verbatim (greedy decoding).

    Under `torchrun --nproc-per-node N`, each rank screens every N-th batch of windows;
    the results are gathered and rank 0 writes the one output file (the same file as one
    process writes).
    """
    from curvedit.evaluate.memorization import FindOptions, find_memorized, found_to_row, write_jsonl  # noqa: PLC0415
    from curvedit.models import load_model  # noqa: PLC0415

    _refuse_existing([out], overwrite)
    options = FindOptions(prefix_len=prefix, suffix_len=suffix, mode=mode, stride=stride, sample=sample,
                          max_windows=max_windows, max_memorized=max_memorized, dedup_threshold=dedup,
                          dedup_ngram=dedup_ngram, batch_size=batch_size, keep_all=keep_all, seed=seed,
                          text_field=text_field)
    with _process_group(device) as (ctx, device):
        try:
            options.validate()
            loaded = load_model(model, device=device, dtype=dtype)
            options = replace(options, progress=ctx.is_main)
            result = find_memorized(loaded.model, loaded.preprocessor, data, options)
            if ctx.is_main:
                write_jsonl((found_to_row(f, loaded.preprocessor) for f in result.found), out, overwrite=overwrite)
        except (DataError, DistributedError, ValueError, FileNotFoundError, FileExistsError) as err:
            _fail(str(err))
    if not ctx.is_main:
        return
    kept = sum(f.memorized for f in result.found)
    typer.echo(f"{result.windows} windows examined, {result.prefiltered} passed the pre-filter, "
               f"{result.memorized} memorized, {result.duplicates} near duplicates dropped; "
               f"wrote {len(result.found)} rows ({kept} memorized) to {out}")


def evaluate_command(
    model: str = typer.Option(..., "--model", help="Model under test (name or directory)."),
    out: Path = typer.Option(..., "--out", help="Results JSON (details go to OUT.details.jsonl)."),
    reference: Optional[str] = typer.Option(None, help="Reference model for nDCG (needs --heldout)."),
    memorized: Optional[List[Path]] = typer.Option(None, help="Memorized-windows JSONL; repeat for several sets."),
    heldout: Optional[Path] = typer.Option(None, help="Held-out corpus for perplexity / nDCG / stress filler."),
    heldout_seq_len: int = typer.Option(512, help="Held-out sequence length."),
    heldout_max_tokens: Optional[int] = typer.Option(100_000, help="Held-out token budget."),
    tasks: Optional[Path] = typer.Option(None, help="Tasks directory (one JSONL file per task) or file."),
    task_limit: Optional[int] = typer.Option(None, help="At most this many items per task."),
    lm_eval_tasks: Optional[str] = typer.Option(None, help="lm-eval task names, comma-separated."),
    lm_eval_limit: Optional[float] = typer.Option(None, help="Documents per lm-eval task."),
    lm_eval_fewshot: Optional[int] = typer.Option(None, help="lm-eval few-shot count."),
    lm_eval_include: Optional[Path] = typer.Option(None, help="Folder of custom lm-eval task YAML files."),
    ndcg_k: int = typer.Option(10, help="nDCG depth."),
    stress: bool = typer.Option(True, help="Run the positional stress test on the memorized sets."),
    left_extend: str = typer.Option("16,32", help="Stress: filler tokens to prepend, comma-separated."),
    right_shift: str = typer.Option("8,16", help="Stress: window shifts in tokens, comma-separated."),
    loose_threshold: float = typer.Option(0.75, help="Loose accuracy threshold on 1 - d/L."),
    batch_size: int = typer.Option(16, help="Sequences per batch."),
    name: Optional[str] = typer.Option(None, help="Run name in reports (default: the model)."),
    text_field: str = typer.Option("text", help="JSON field with the text."),
    device: str = typer.Option("cpu", help="Device."),
    dtype: Optional[str] = typer.Option(None, help="Weight dtype (bf16, fp16, float32)."),
    overwrite: bool = typer.Option(False, help="Replace existing results files."),
) -> None:
    """Evaluate memorization (strict/loose recitation), guards (perplexity, nDCG), tasks and the stress test.

    Under `torchrun --nproc-per-node N`, the batches of every measurement are shared out
    over the ranks and gathered; rank 0 writes the results (the same numbers as one
    process). lm-eval tasks need a single process.
    """
    from curvedit.evaluate.results import details_path, write_results  # noqa: PLC0415
    from curvedit.evaluate.runner import EvaluateOptions  # noqa: PLC0415
    from curvedit.evaluate.stress import StressOptions  # noqa: PLC0415

    _refuse_existing([out, details_path(out)], overwrite)
    stress_options = StressOptions(left_extend=_int_list(left_extend), right_shift=_int_list(right_shift),
                                   batch_size=batch_size) if stress else None
    options = EvaluateOptions(
        memorized=tuple(memorized or ()), heldout=heldout, heldout_seq_len=heldout_seq_len,
        heldout_max_tokens=heldout_max_tokens, tasks=tasks, task_limit=task_limit,
        lm_eval_tasks=tuple(t.strip() for t in (lm_eval_tasks or "").split(",") if t.strip()),
        lm_eval_limit=lm_eval_limit, lm_eval_fewshot=lm_eval_fewshot, lm_eval_include=lm_eval_include,
        ndcg_k=ndcg_k, stress=stress_options, loose_threshold=loose_threshold, batch_size=batch_size,
        text_field=text_field)
    with _process_group(device) as (ctx, device):
        options = replace(options, progress=ctx.is_main)  # one set of progress bars
        evaluation = _evaluate(model, reference, options, stress_options, device, dtype, name, ctx)
        if ctx.is_main:
            try:
                paths = write_results(out, evaluation, overwrite=overwrite)
            except (ValueError, FileExistsError) as err:
                _fail(str(err))
    if not ctx.is_main:
        return
    for note in evaluation.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"wrote {paths[0]} and {paths[1]}")


def _evaluate(model: str, reference: Optional[str], options: "EvaluateOptions",
              stress_options: "StressOptions | None", device: str, dtype: Optional[str], name: Optional[str],
              ctx: DistContext) -> "Evaluation":
    """Load the model (and the reference for nDCG) and run the evaluation; clear errors."""
    import torch  # noqa: PLC0415

    from curvedit.evaluate.runner import evaluate_model, reference_rankings  # noqa: PLC0415
    from curvedit.models import load_model  # noqa: PLC0415

    try:
        options.validate()
        if stress_options is not None:
            stress_options.validate()
        if ctx.distributed and options.lm_eval_tasks:
            raise ValueError("--lm-eval-tasks needs a single process (lm-eval shards with its own launcher); "
                             "run them without torchrun")
        rankings = None
        if reference is not None:
            if options.heldout is None:
                raise ValueError("--reference is used for nDCG, which needs --heldout")
            ref = load_model(reference, device=device, dtype=dtype)
            rankings = reference_rankings(ref, options)
            del ref
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        loaded = load_model(model, device=device, dtype=dtype)
        return evaluate_model(loaded, options, reference=rankings, reference_name=reference, name=name)
    except (DataError, DistributedError, ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
        _fail(str(err))


def report_command(
    results: List[Path] = typer.Argument(..., help="Results JSON files (one per run)."),
    out: Path = typer.Option(..., "--out", help="Report folder."),
    reference_name: Optional[str] = typer.Option(None, help="Run to compare against (default: the first file's)."),
    overwrite: bool = typer.Option(False, help="Replace existing report files."),
) -> None:
    """Compare results files: Markdown and HTML tables with retention, and bar charts."""
    from curvedit.evaluate.report import ReportOptions, build_report  # noqa: PLC0415

    try:
        written = build_report(results, out, ReportOptions(reference_name=reference_name, overwrite=overwrite))
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        _fail(str(err))
    typer.echo(f"wrote {len(written)} files to {out}")


def register(app: typer.Typer) -> None:
    """Add the evaluation commands to the `curvedit` app.

    Args:
        app: the typer application.
    """
    app.command("find-memorized")(find_memorized_command)
    app.command("evaluate")(evaluate_command)
    app.command("report")(report_command)
