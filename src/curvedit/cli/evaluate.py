"""The `find-memorized`, `evaluate` and `report` commands."""

from __future__ import annotations

import contextlib
import gc
import importlib.util
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, List, Optional

import typer

from curvedit.cli.common import (
    DtypeOpt,
    ProgressOpt,
    TextFieldOpt,
    check_output,
    device_option,
    fail,
    int_list,
    model_option,
    out_option,
    overwrite_option,
)

if TYPE_CHECKING:
    from curvedit.distributed import DistContext
    from curvedit.evaluate.runner import EvaluateOptions, Evaluation


@contextlib.contextmanager
def _process_group(device: str) -> Iterator[tuple["DistContext", str]]:
    """The torchrun process group (if launched by torchrun) for the command's duration:
    (this rank's context, the device it must use)."""
    from curvedit.distributed import destroy, init_from_env

    ctx, device = init_from_env(device)
    try:
        yield ctx, device  # no barrier at the end: only rank 0 writes, and no rank reads it
    finally:
        destroy()


def find_memorized_command(
    model: str = model_option("Model name or directory."),
    data: str = typer.Option(..., "--data", help="Corpus: .jsonl/.txt file, folder, or datasets name."),
    out: Path = out_option("Output JSONL of memorized windows."),
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
    text_field: str = TextFieldOpt,
    device: str = device_option(),
    dtype: Optional[str] = DtypeOpt,
    overwrite: bool = overwrite_option("Replace an existing output file."),
    progress: bool = ProgressOpt,
) -> None:
    """Find the windows of a corpus that the model recites verbatim (greedy decoding).

    Under `torchrun --nproc-per-node N`, each rank screens every N-th batch of windows;
    the results are gathered and rank 0 writes the one output file (the same file as one
    process writes).
    """
    from curvedit.data import check_corpus_source, write_jsonl
    from curvedit.evaluate.memorization import FindOptions, find_memorized, found_to_row
    from curvedit.models import load_model

    check_output(out, kind="file", overwrite=overwrite, inputs=[data])
    check_corpus_source(data)
    options = FindOptions(prefix_len=prefix, suffix_len=suffix, mode=mode, stride=stride, sample=sample,
                          max_windows=max_windows, max_memorized=max_memorized, dedup_threshold=dedup,
                          dedup_ngram=dedup_ngram, batch_size=batch_size, keep_all=keep_all, seed=seed,
                          text_field=text_field)
    options.validate()
    with _process_group(device) as (ctx, device):
        options = replace(options, progress=progress and ctx.is_main)
        loaded = load_model(model, device=device, dtype=dtype, progress=options.progress)
        result = find_memorized(loaded.model, loaded.preprocessor, data, options)
        if ctx.is_main:
            write_jsonl((found_to_row(f, loaded.preprocessor) for f in result.found), out, overwrite=overwrite)
    if not ctx.is_main:
        return
    kept = sum(f.memorized for f in result.found)
    typer.echo(f"{result.windows} windows examined, {result.prefiltered} passed the pre-filter, "
               f"{result.memorized} memorized, {result.duplicates} near duplicates dropped; "
               f"wrote {len(result.found)} rows ({kept} memorized) to {out}")


def evaluate_command(
    model: str = model_option("Model under test (name or directory)."),
    out: Path = out_option("Results JSON (details go to OUT.details.jsonl)."),
    reference: Optional[str] = typer.Option(
        None, help="Reference (unedited) model: nDCG (needs --heldout) and the reference MIA score (needs --mia)."),
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
    ndcg_gain: str = typer.Option("rank", help="nDCG relevance: rank (the paper's code: 10 for the reference's "
                                               "top-1 ... 1 for its 10th) or probability."),
    stress: str = typer.Option("reference", help="Stress test on the memorized sets: reference (the paper's "
                                                 "position perturbations), filler, or none."),
    stress_t: int = typer.Option(20, help="Stress (reference): extensions up to t tokens, truncations from t+1."),
    stress_original: bool = typer.Option(False, help="Stress (reference): count the unperturbed prompt in the max."),
    left_extend: str = typer.Option("16,32", help="Stress (filler): filler tokens to prepend, comma-separated."),
    right_shift: str = typer.Option("8,16", help="Stress (filler): window shifts in tokens, comma-separated."),
    mia: Optional[Path] = typer.Option(None, help="Non-member corpus: membership-inference AUROCs of the memorized "
                                                  "windows against windows of this text."),
    mia_max: int = typer.Option(1000, help="At most this many non-member windows."),
    min_k: float = typer.Option(20.0, help="k (percent) of the Min-K% and Min-K%++ scores."),
    samples: int = typer.Option(0, help="Sampled extraction: chance that one of N sampled continuations is the "
                                        "suffix (0: skip)."),
    temperature: float = typer.Option(1.0, help="Sampling temperature of the sampled extraction."),
    loose_threshold: float = typer.Option(0.75, help="Loose accuracy threshold on 1 - d/L."),
    batch_size: int = typer.Option(16, help="Sequences per batch."),
    name: Optional[str] = typer.Option(None, help="Run name in reports (default: the model)."),
    text_field: str = TextFieldOpt,
    device: str = device_option(),
    dtype: Optional[str] = DtypeOpt,
    overwrite: bool = overwrite_option("Replace existing results files."),
    progress: bool = ProgressOpt,
) -> None:
    """Evaluate memorization (strict/loose recitation), guards (perplexity, nDCG), tasks and the stress test.

    Under `torchrun --nproc-per-node N`, the batches of every measurement are shared out
    over the ranks and gathered; rank 0 writes the results (the same numbers as one
    process). lm-eval tasks need a single process.
    """
    from curvedit.data import check_corpus_source
    from curvedit.evaluate.privacy import PrivacyOptions
    from curvedit.evaluate.results import details_path, write_results
    from curvedit.evaluate.runner import EvaluateOptions
    from curvedit.evaluate.stress import ReferenceStressOptions, StressOptions

    inputs = [*(memorized or ()), *(p for p in (heldout, tasks, mia) if p is not None)]
    check_output(out, kind="file", overwrite=overwrite, inputs=inputs)
    check_output(details_path(out), kind="file", overwrite=overwrite, inputs=inputs, option="--out (details file)")
    if stress not in ("reference", "filler", "none"):
        fail(f"--stress must be reference, filler or none, got {stress!r}")
    stress_options = {
        "reference": lambda: ReferenceStressOptions(t=stress_t, include_original=stress_original,
                                                    batch_size=batch_size),
        "filler": lambda: StressOptions(left_extend=int_list(left_extend, "--left-extend"),
                                        right_shift=int_list(right_shift, "--right-shift"), batch_size=batch_size),
        "none": lambda: None}[stress]()
    options = EvaluateOptions(
        memorized=tuple(memorized or ()), heldout=heldout, heldout_seq_len=heldout_seq_len,
        heldout_max_tokens=heldout_max_tokens, tasks=tasks, task_limit=task_limit,
        lm_eval_tasks=tuple(t.strip() for t in (lm_eval_tasks or "").split(",") if t.strip()),
        lm_eval_limit=lm_eval_limit, lm_eval_fewshot=lm_eval_fewshot, lm_eval_include=lm_eval_include,
        ndcg_k=ndcg_k, ndcg_gain=ndcg_gain, stress=stress_options, loose_threshold=loose_threshold,
        batch_size=batch_size, text_field=text_field, mia=mia, mia_max_nonmembers=mia_max,
        privacy=PrivacyOptions(k_percent=min_k, samples=samples, temperature=temperature, batch_size=batch_size))
    options.validate()
    if reference is not None and heldout is None and mia is None:
        fail("--reference is used for nDCG (needs --heldout) and the reference MIA score (needs --mia); give one")
    if options.lm_eval_tasks and importlib.util.find_spec("lm_eval") is None:
        fail("--lm-eval-tasks needs lm-evaluation-harness: pip install 'lm-eval[hf]'")
    for corpus in (heldout, mia):
        if corpus is not None:
            check_corpus_source(corpus)
    with _process_group(device) as (ctx, device):
        if ctx.distributed and options.lm_eval_tasks:
            fail("--lm-eval-tasks needs a single process (lm-eval shards with its own launcher); "
                 "run them without torchrun")
        options = replace(options, progress=progress and ctx.is_main)  # one set of progress bars
        evaluation = _evaluate(model, reference, options, device, dtype, name)
        if ctx.is_main:
            paths = write_results(out, evaluation, overwrite=overwrite)
    if not ctx.is_main:
        return
    for note in evaluation.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"wrote {paths[0]} and {paths[1]}")


def _evaluate(model: str, reference: Optional[str], options: "EvaluateOptions", device: str, dtype: Optional[str],
              name: Optional[str]) -> "Evaluation":
    """Load the model (and first the reference, freed once its rankings and losses are kept) and evaluate."""
    import torch

    from curvedit.evaluate.runner import evaluate_model, reference_side
    from curvedit.models import load_model

    side = None
    if reference is not None:
        ref = load_model(reference, device=device, dtype=dtype, progress=options.progress)
        side = reference_side(ref, options)
        del ref
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    loaded = load_model(model, device=device, dtype=dtype, progress=options.progress)
    return evaluate_model(loaded, options, reference=side, reference_name=reference, name=name)


def report_command(
    results: List[Path] = typer.Argument(..., help="Results JSON files (one per run)."),
    out: Path = out_option("Report folder."),
    reference_name: Optional[str] = typer.Option(None, help="Run to compare against (default: the first file's)."),
    overwrite: bool = overwrite_option("Replace existing report files."),
) -> None:
    """Compare results files: Markdown and HTML tables with retention, and bar charts."""
    from curvedit.evaluate.report import ReportOptions, build_report

    check_output(out, kind="dir", overwrite=overwrite, names=("report.md", "report.html"))
    written = build_report(results, out, ReportOptions(reference_name=reference_name, overwrite=overwrite))
    typer.echo(f"wrote {len(written)} files to {out}")


def register(app: typer.Typer) -> None:
    """Add `find-memorized`, `evaluate` and `report` to the `curvedit` app."""
    app.command("find-memorized")(find_memorized_command)
    app.command("evaluate")(evaluate_command)
    app.command("report")(report_command)
