"""The `curvedit` command: a thin layer over the Python API."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Find and remove verbatim memorization with the curvature of the loss (K-FAC).")

ModelOpt = typer.Option(..., "--model", "-m", help="HF model name or local directory.")
PresetOpt = typer.Option(None, "--preset", help="Target preset: mlp, mlp-in, mlp-out.")
TargetsOpt = typer.Option(None, "--targets", "-t", help="Module-name glob (or 're:REGEX'); repeatable.")
LayersOpt = typer.Option(None, "--layers", help="Layer range, e.g. 23-25 or 0,3,5-7.")
DeviceOpt = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ...")


def fail(message: str) -> None:
    """Print a clear error and exit with status 2 (no traceback)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def target_spec(preset: Optional[str], targets: Optional[list[str]], layers: Optional[str]):
    """Build a TargetSpec from CLI options; default preset is 'mlp'."""
    from curvedit.targets import TargetSpec

    if not preset and not targets:
        preset = "mlp"
    return TargetSpec(patterns=tuple(targets or ()), preset=preset, layers=layers)


@app.callback()
def main() -> None:
    """curvedit: collect K-FAC factors, edit weights, evaluate memorization."""


@app.command()
def version() -> None:
    """Print the curvedit version."""
    from curvedit import __version__

    typer.echo(__version__)


@app.command()
def collect(
    model: str = ModelOpt,
    data: str = typer.Option(..., "--data", "-d", help="JSONL (text or input_ids), .txt, a folder, a datasets name; "
                                                       "for image models a folder of CLASS/*.png."),
    out: Path = typer.Option(..., "--out", "-o", help="Factor directory to write."),
    preset: Optional[str] = PresetOpt,
    targets: Optional[list[str]] = TargetsOpt,
    layers: Optional[str] = LayersOpt,
    labels: str = typer.Option("sampled", "--labels", help="sampled (true Fisher) or gold (empirical Fisher)."),
    seq_len: int = typer.Option(512, "--seq-len", help="Sequence length for packing text / cutting input_ids."),
    batch_size: int = typer.Option(8, "--batch-size"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Token budget (LMs) / image count (vision)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the label sampler."),
    accumulate: str = typer.Option("float32", "--accumulate-dtype", help="float32 or float64 accumulators."),
    model_dtype: Optional[str] = typer.Option(None, "--model-dtype", help="Load weights as bf16/fp16/float32."),
    device: str = DeviceOpt,
    positions: str = typer.Option("cls", "--positions", help="Vision: cls (default) or all token positions."),
    text_field: str = typer.Option("text", "--text-field"),
    split: str = typer.Option("train", "--split", help="Split, for datasets sources."),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", help="Batches between checkpoints."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing factors in --out."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    layers_per_pass: Optional[int] = typer.Option(
        None, "--layers-per-pass", help="Hook the targets of at most this many blocks per pass over the data (one "
                                        "pass per group; the data is read once per pass). Default: one pass."),
    gradient_checkpointing: bool = typer.Option(
        False, "--gradient-checkpointing", help="Recompute each block's activations in the backward pass: less "
                                                "activation memory, about one more forward pass of compute."),
    fsdp: bool = typer.Option(
        False, "--fsdp", help="Under torchrun: shard the weights over the processes (FSDP2, one unit per block); "
                              "the model is loaded on the CPU and only its shards move to the device."),
    memory_check: bool = typer.Option(
        True, "--memory-check/--no-memory-check", help="Refuse to start when the memory plan (printed first) "
                                                      "says the run will not fit in the device's free memory."),
) -> None:
    """Collect K-FAC factors (A = E[x x^T], G = E[g g^T]) for the target weights.

    Data parallel: `torchrun --nproc-per-node N $(which curvedit) collect ...` runs N
    processes (gloo on CPU; NCCL with --device cuda, rank r on cuda:LOCAL_RANK); each
    processes every N-th batch, the sums are all-reduced, and rank 0 alone writes. With
    --fsdp the weights are sharded over the processes too (FSDP2, one unit per block).
    """
    from curvedit.collect import CollectError, CollectOptions, collect_factors
    from curvedit.data import DataError, image_batches, lm_batches, read_records, token_sequences
    from curvedit.distributed import DistributedError, all_agree, barrier, destroy, init_from_env, shard_model
    from curvedit.factors import META_FILE, save_factors
    from curvedit.memory import plan_memory
    from curvedit.models import load_model
    from curvedit.objectives import ImageClassificationObjective
    from curvedit.targets import TargetError, select_targets

    if (out / META_FILE).exists() and not overwrite:
        fail(f"{out} already holds factors; pass --overwrite to replace them")
    try:
        ctx, device = init_from_env(device)
    except DistributedError as err:
        fail(str(err))
    if fsdp and not ctx.distributed:
        fail("--fsdp shards the weights over several processes: launch with torchrun --nproc-per-node N (N >= 2)")
    try:
        try:
            loaded = load_model(model, device="cpu" if fsdp else device, dtype=model_dtype)
            chosen = select_targets(loaded.model, target_spec(preset, targets, layers))
            plan = plan_memory(loaded.model, chosen, batch_size, seq_len, accumulate, layers_per_pass, device,
                               ranks_sharing_memory=ctx.local_world_size if device == "cpu" else 1,
                               gradient_checkpointing=gradient_checkpointing,
                               weight_shards=ctx.world_size if fsdp else 1)
            if ctx.is_main:
                typer.echo(plan.table(), err=True)
            if memory_check and not all_agree(plan.fits, ctx):
                reason = (f"needs about {plan.needed_bytes / 2**30:.1f} GiB, {plan.available_bytes / 2**30:.1f} GiB "
                          f"free on {device}; {plan.suggestion}" if not plan.fits else "another rank's plan does not fit")
                fail(f"the memory plan says this run will not fit: {reason} (--no-memory-check runs it anyway)")
            if fsdp:
                shard_model(loaded.model, device, ctx)
            options = CollectOptions(label_mode=labels, accumulate_dtype=accumulate, seed=seed, checkpoint_dir=out,
                                     checkpoint_every=checkpoint_every, resume=resume, progress=progress,
                                     description=str(data), layers_per_pass=layers_per_pass,
                                     gradient_checkpointing=gradient_checkpointing)
            if loaded.kind == "image-classification":
                def batches():
                    return image_batches(data, loaded.preprocessor, batch_size, max_images=max_tokens)
                objective = ImageClassificationObjective(labels, positions)
                options.extra = {"positions": positions}
            else:
                tokenizer = loaded.preprocessor
                pad_id = getattr(tokenizer, "pad_token_id", None) or 0

                def batches():
                    sequences = token_sequences(read_records(data, text_field=text_field, split=split),
                                                tokenizer, seq_len, max_tokens)
                    return lm_batches(sequences, batch_size, pad_id)
                objective = None
                options.total_tokens = max_tokens
                options.extra = {"seq_len": seq_len, "max_tokens": max_tokens, "batch_size": batch_size}
            factors = collect_factors(loaded.model, batches, chosen, objective, options, model_name=model)
        except (CollectError, DataError, DistributedError, TargetError, ValueError, FileNotFoundError) as err:
            fail(str(err))
        if ctx.is_main:
            save_factors(factors, out)
            for stale in ("checkpoint.safetensors", "checkpoint.json"):
                (out / stale).unlink(missing_ok=True)
            typer.echo(f"wrote factors for {len(factors.targets)} targets to {out} "
                       f"({factors.collection['tokens']} tokens, "
                       f"{next(iter(factors.targets.values())).positions} positions"
                       + (f", {ctx.world_size} processes)" if ctx.distributed else ")"))
        barrier(ctx)
    finally:
        destroy()


@app.command()
def merge(
    parts: list[Path] = typer.Argument(..., help="Factor directories collected on disjoint data."),
    out: Path = typer.Option(..., "--out", "-o"),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Merge factor directories into their position-weighted mean."""
    from curvedit.factors import META_FILE, FactorError, load_factors, merge_factors, save_factors

    if (out / META_FILE).exists() and not overwrite:
        fail(f"{out} already holds factors; pass --overwrite to replace them")
    if any(out.resolve() == p.resolve() for p in parts):
        fail("--out must not be one of the inputs")
    try:
        merged = merge_factors([load_factors(p) for p in parts])
    except FactorError as err:
        fail(str(err))
    save_factors(merged, out)
    typer.echo(f"merged {len(parts)} factor sets into {out} "
               f"({next(iter(merged.targets.values())).positions} positions per target)")


@app.command()
def edit(
    model: str = ModelOpt,
    factors: Optional[Path] = typer.Option(None, "--factors", "-f", help="Factor directory (not needed for svd)."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for the edited HF model."),
    preset: Optional[str] = PresetOpt,
    targets: Optional[list[str]] = TargetsOpt,
    layers: Optional[str] = LayersOpt,
    rho: Optional[float] = typer.Option(None, "--rho", help="Fraction of curvature mass to keep, in (0, 1]."),
    keep_fraction: Optional[float] = typer.Option(None, "--keep-fraction", help="Fraction of components to keep."),
    plan_file: Optional[Path] = typer.Option(None, "--plan", help="JSON plan: {pattern: rho} or {rules: [...]}."),
    method: str = typer.Option("kfac", "--method", help="kfac, svd, random or lowest."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random control."),
    device: str = DeviceOpt,
    eigh_precision: str = typer.Option("float64", "--eigh-precision",
                                       help="float64, or float32 (faster on GPUs) checked by its residual, "
                                            "falling back to float64."),
    compute_dtype: Optional[str] = typer.Option(None, "--compute-dtype",
                                                help="float64 (default) or float32 for the edit's matrix products."),
    ppl_budget: Optional[float] = typer.Option(
        None, "--ppl-budget", help="Instead of --rho/--keep-fraction/--plan: bisect the strongest edit of the selected "
                                   "targets whose held-out perplexity stays within this x the unedited one (needs "
                                   "--heldout)."),
    heldout: Optional[Path] = typer.Option(None, "--heldout", help="Held-out corpus for --ppl-budget (read like "
                                                                   "evaluate reads it)."),
    budget_knob: str = typer.Option("keep_fraction", "--budget-knob", help="What --ppl-budget bisects: keep_fraction "
                                                                           "(smooth on real models) or rho."),
    budget_steps: int = typer.Option(10, "--budget-steps", help="Bisection steps (amount resolved to 2^-steps)."),
    heldout_seq_len: int = typer.Option(512, "--heldout-seq-len", help="Held-out sequence length (capped at the "
                                                                       "context window)."),
    heldout_max_tokens: Optional[int] = typer.Option(100_000, "--heldout-max-tokens", help="Held-out token budget."),
    batch_size: int = typer.Option(16, "--batch-size", help="Held-out sequences per forward pass (--ppl-budget)."),
    text_field: str = typer.Option("text", "--text-field"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar over the --ppl-budget steps."),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Edit target weights (keep the top curvature mass) and save a normal HF model.

    With --ppl-budget X the amount (--budget-knob) is bisected in memory on the held-out
    text to the strongest edit within X times the unedited perplexity, then applied; the
    steps are printed and recorded under "budget" in curvedit-edit.json.
    """
    from curvedit.budget import BudgetError, edit_within_budget
    from curvedit.data import DataError
    from curvedit.edit import EditError, EditPlan, EditRule, edit_manifest, edit_model, save_edited_model
    from curvedit.evaluate.memorization import default_pad_id
    from curvedit.evaluate.runner import EvaluateOptions, load_heldout
    from curvedit.factors import FactorError
    from curvedit.models import ModelLoadError, load_model
    from curvedit.spectrum import EIGH_PRECISIONS, EighError, SelectionError
    from curvedit.targets import TargetError, select_targets

    if ppl_budget is not None and (rho is not None or keep_fraction is not None or plan_file is not None):
        fail("--ppl-budget chooses the amount itself: give it without --rho, --keep-fraction or --plan")
    if ppl_budget is not None and heldout is None:
        fail("--ppl-budget needs --heldout (held-out text to measure the perplexity on)")
    if ppl_budget is None and heldout is not None:
        fail("--heldout is only read with --ppl-budget")
    if eigh_precision not in EIGH_PRECISIONS:
        fail(f"--eigh-precision must be one of {', '.join(EIGH_PRECISIONS)}, got {eigh_precision!r}")
    if out.exists() and Path(model).exists() and out.resolve() == Path(model).resolve():
        fail(f"refusing to write the edited model into the input model's directory {model}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        fail(f"{out} exists and is not empty; pass --overwrite to replace it")
    search = None
    try:
        if ppl_budget is not None:
            plan = None
        elif plan_file is not None:
            plan = EditPlan.from_json(plan_file, method=method, seed=seed,
                                      **({"compute_dtype": compute_dtype} if compute_dtype else {}))
        elif (rho is None) == (keep_fraction is None):
            fail("give one of --rho, --keep-fraction or --plan")
        else:
            plan = EditPlan([EditRule("*", rho=rho, keep_fraction=keep_fraction)], method=method, seed=seed,
                            compute_dtype=compute_dtype or "float64")
        loaded = load_model(model, device=device)
        chosen = select_targets(loaded.model, target_spec(preset, targets, layers))
        if plan is not None:
            applied = edit_model(loaded.model, chosen, plan, factors, device, eigh_precision)
        else:
            sequences = load_heldout(loaded, EvaluateOptions(heldout=heldout, heldout_seq_len=heldout_seq_len,
                                                             heldout_max_tokens=heldout_max_tokens,
                                                             text_field=text_field))
            search, applied = edit_within_budget(
                loaded.model, chosen, factors, sequences, budget=ppl_budget, knob=budget_knob, method=method,
                seed=seed, compute_dtype=compute_dtype or "float64", device=device, eigh_precision=eigh_precision,
                steps=budget_steps, batch_size=batch_size, pad_id=default_pad_id(loaded.preprocessor),
                progress=progress)
            if not search.edited:
                typer.echo(search.table(), err=True)
                fail(f"no {budget_knob} below 1 keeps the perplexity within x{ppl_budget:g} of the unedited "
                     f"{search.unedited_perplexity:.4f}; nothing written (raise --ppl-budget or edit fewer targets)")
        manifest = edit_manifest(applied, model, factors, eigh_precision, loaded.source)
        if search is not None:
            manifest["budget"] = {**search.to_dict(), "heldout": {"path": str(heldout), "seq_len": heldout_seq_len,
                                                                  "max_tokens": heldout_max_tokens,
                                                                  "sequences": len(sequences)}}
        save_edited_model(loaded.model, loaded.preprocessor, out, manifest, source=model, overwrite=overwrite)
    except (BudgetError, DataError, EditError, EighError, FactorError, ModelLoadError, SelectionError,
            TargetError) as err:
        fail(str(err))
    if search is not None:
        typer.echo(search.table())
    typer.echo(f"{'target':<48} {'kept':>12} {'of':>12} {'mass kept':>10} {'|dW|/|W|':>9}")
    for s in applied.stats:
        typer.echo(f"{s.name:<48} {s.kept:>12} {s.total:>12} {s.mass_kept:>10.4f} {s.rel_change:>9.4f}")
    typer.echo(f"wrote edited model to {out}")


@app.command()
def spectrum(
    factors: Path = typer.Argument(..., help="Factor directory."),
    rho: Optional[float] = typer.Option(0.6, "--rho", help="Mark this mass fraction on the curves."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for PNGs (default FACTORS/spectrum)."),
) -> None:
    """Plot factor spectra and cumulative curvature mass per target; print a table."""
    from curvedit.factors import FactorError, load_factors
    from curvedit.plots import plot_spectrum
    from curvedit.spectrum import SelectionError, cached_eigenbases, mass_curve, select_by_count, select_by_mass

    try:
        loaded = load_factors(factors)
        bases = cached_eigenbases(factors, loaded.targets, list(loaded.targets))
        if rho is not None and not 0 < rho <= 1:
            raise SelectionError(f"rho must be in (0, 1], got {rho}")
    except (FactorError, SelectionError) as err:
        fail(str(err))
    folder = out or factors / "spectrum"
    typer.echo(f"{'target':<48} {'d_out':>6} {'d_in':>6} {'positions':>10} {'kept@rho':>9} {'top1% mass':>10}")
    for name, basis in bases.items():
        kept = float(select_by_mass(basis.lam, basis.mu, rho).float().mean()) if rho is not None else None
        top = float(select_by_count(basis.lam, basis.mu, 0.01).double().mul(
            basis.lam[:, None] * basis.mu[None, :]).sum() / (basis.lam.sum() * basis.mu.sum()))
        plot_spectrum(name, basis.lam, basis.mu, mass_curve(basis.lam, basis.mu), rho, kept,
                      folder / f"{name}.png")
        kept_text = f"{100 * kept:8.2f}%" if kept is not None else "-"
        typer.echo(f"{name:<48} {len(basis.lam):>6} {len(basis.mu):>6} {loaded.targets[name].positions:>10} "
                   f"{kept_text:>9} {100 * top:>9.1f}%")
    typer.echo(f"plots in {folder}")


@app.command()
def demo(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for the report and results "
                                                                  "(default demo-out, with --vision demo-out/vision)."),
    retrain: bool = typer.Option(False, "--retrain", help="Train the demo model even if a matching one exists."),
    smoke: bool = typer.Option(False, "--smoke", help="A seconds-long run on a tiny world (checks the plumbing)."),
    vision: bool = typer.Option(False, "--vision", help="Instead: a ViT that memorizes noisy labels on "
                                                        "scikit-learn's digits, and the edit that undoes it."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Run the paper end to end on a synthetic world: train, find, collect, sweep, edit, report."""
    if vision:
        from curvedit.data import DataError
        from curvedit.demo.vision import VisionDemoOptions, run_vision_demo, smoke_vision_options
        from curvedit.demo.vision_report import vision_table

        out = out or Path("demo-out/vision")
        vision_options = smoke_vision_options(out) if smoke else VisionDemoOptions(out=out)
        vision_options.retrain, vision_options.progress = retrain, progress and not smoke
        try:
            results = run_vision_demo(vision_options)
        except (DataError, RuntimeError, ValueError) as err:
            fail(str(err))
        typer.echo(vision_table(results))
        typer.echo(f"\nreport: {out / 'report.md'}  results: {out / 'results.json'}  "
                   f"total {sum(results['timings_s'].values()):.0f} s")
        return
    from curvedit.demo.pipeline import DemoOptions, run_demo, smoke_options
    from curvedit.demo.report import family_table, memorization_table

    out = out or Path("demo-out")
    options = smoke_options(out) if smoke else DemoOptions(out=out)
    options.retrain, options.progress = retrain, progress and not smoke
    results = run_demo(options)
    typer.echo(memorization_table(results))
    typer.echo("")
    typer.echo(family_table(results))
    typer.echo(f"\nreport: {out / 'report.md'}  results: {out / 'results.json'}  "
               f"total {sum(results['timings_s'].values()):.0f} s")


from curvedit.evaluate.cli import register as _register_evaluate
_register_evaluate(app)

from curvedit.baselines.cli import register as _register_baselines
from curvedit.analysis_cli import register as _register_analysis
_register_baselines(app)
_register_analysis(app)

from curvedit.implant_cli import register as _register_implant
_register_implant(app)

from curvedit.studies.cli import register as _register_studies
_register_studies(app)
