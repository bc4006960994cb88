"""The `edit` and `spectrum` commands."""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from curvedit.cli.common import (
    DeviceOpt,
    LayersOpt,
    TextFieldOpt,
    check_output,
    fail,
    model_option,
    out_option,
    overwrite_option,
    preset_option,
    read_windows,
    target_spec,
    targets_option,
)

if TYPE_CHECKING:
    from curvedit.editing.edit import EditRule
    from curvedit.editing.settings import EditSettings
    from curvedit.evaluate.runner import EvaluateOptions
    from curvedit.kfac.targets import TargetSpec


def edit_command(
    model: str = model_option(),
    factors: Optional[Path] = typer.Option(None, "--factors", "-f", help="Factor directory (not needed for svd)."),
    out: Path = out_option("Directory for the edited HF model."),
    preset: Optional[str] = preset_option(),
    targets: Optional[list[str]] = targets_option(),
    layers: Optional[str] = LayersOpt,
    rho: Optional[float] = typer.Option(None, "--rho", help="Fraction of curvature mass to keep, in (0, 1]."),
    keep_fraction: Optional[float] = typer.Option(None, "--keep-fraction", help="Fraction of components to keep."),
    plan_file: Optional[Path] = typer.Option(None, "--plan", help="JSON plan: {pattern: rho} or {rules: [...]}."),
    method: Optional[str] = typer.Option(None, "--method", help="kfac, svd, random, lowest, identity (the standard "
                                                                "basis: with --masses saliency, magnitude pruning) or "
                                                                "noise (noise of the edit's norm in its removed "
                                                                "block) [default: the plan's, else kfac]."),
    seed: Optional[int] = typer.Option(None, "--seed",
                                       help="Seed of the random control [default: the plan's, else 0]."),
    device: str = DeviceOpt,
    eigh_precision: str = typer.Option("float64", "--eigh-precision",
                                       help="float64, or float32 (faster on GPUs) checked by its residual, "
                                            "falling back to float64."),
    compute_dtype: Optional[str] = typer.Option(None, "--compute-dtype",
                                                help="float64 (default) or float32 for the edit's matrix products."),
    masses: Optional[str] = typer.Option(None, "--masses", help="What ranks the components: kfac (lam_i * mu_j, "
                                                                "default), ekfac (needs collect --eigencorrect), "
                                                                "targeted (needs --forget) or saliency "
                                                                "(lam_i * mu_j * C_ij^2)."),
    forget: Optional[Path] = typer.Option(None, "--forget", help="Memorized windows to target: remove the components "
                                                                 "whose forget-set mass is largest relative to the "
                                                                 "general mass (implies --masses targeted)."),
    side: Optional[str] = typer.Option(None, "--side", help="G or A: keep only the top output (G) or input (A) "
                                                           "eigendirections, whole, at --rho (of that side's "
                                                           "eigenvalue mass) or --keep-fraction."),
    block: Optional[str] = typer.Option(None, "--block", help="PxQ, e.g. 0.6x0.6: instead of an amount, remove the "
                                                             "flattest block (the last P of G's by the last Q of "
                                                             "A's eigendirections)."),
    protect: Optional[Path] = typer.Option(
        None, "--protect", help="A factor folder collected (from this model) on a population to keep: components in "
                                "its top curvature, expressed in the general eigenbasis, are kept too."),
    protect_rho: Optional[float] = typer.Option(None, "--protect-rho", help="Protect mass kept [default: the edit's "
                                                                             "own amount]."),
    protect_keep_fraction: Optional[float] = typer.Option(None, "--protect-keep-fraction",
                                                          help="Or a share of the components, by protect mass."),
    step_from: Optional[Path] = typer.Option(
        None, "--step-from", help="Memorized windows (JSONL): instead of deleting, take one coherent step up their "
                                  "suffix loss inside the flat block, the components --rho / --keep-fraction does "
                                  "not keep (with --step-norm, or --ppl-budget to bisect the norm)."),
    step_norm: Optional[float] = typer.Option(None, "--step-norm", help="Frobenius norm of the --step-from step, over "
                                                                         "all targets together."),
    ppl_budget: Optional[float] = typer.Option(
        None, "--ppl-budget", help="Instead of --rho/--keep-fraction/--plan: bisect the strongest edit of the selected "
                                   "targets whose held-out perplexity stays within this x the unedited one (needs "
                                   "--heldout; with --step-from, the step norm is bisected)."),
    heldout: Optional[Path] = typer.Option(None, "--heldout", help="Held-out corpus for --ppl-budget (read like "
                                                                   "evaluate reads it)."),
    budget_knob: str = typer.Option("keep_fraction", "--budget-knob", help="What --ppl-budget bisects: keep_fraction "
                                                                           "(smooth on real models) or rho."),
    budget_steps: int = typer.Option(10, "--budget-steps", help="Bisection steps (amount resolved to 2^-steps)."),
    heldout_seq_len: int = typer.Option(512, "--heldout-seq-len", help="Held-out sequence length (capped at the "
                                                                       "context window)."),
    heldout_max_tokens: Optional[int] = typer.Option(100_000, "--heldout-max-tokens", help="Held-out token budget."),
    batch_size: int = typer.Option(16, "--batch-size", help="Held-out sequences per forward pass (--ppl-budget)."),
    text_field: str = TextFieldOpt,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar over the --ppl-budget steps."),
    overwrite: bool = overwrite_option("Replace a non-empty --out."),
) -> None:
    """Edit target weights (keep the top curvature mass) and save a normal HF model.

    With --ppl-budget X the amount (--budget-knob) is bisected in memory on the held-out
    text to the strongest edit within X times the unedited perplexity, then applied; the
    steps are printed and recorded under "budget" in curvedit-edit.json.
    """
    from curvedit.data import check_corpus_source, default_pad_id
    from curvedit.editing.budget import edit_within_budget
    from curvedit.editing.edit import EditPlan, EditRule, edit_manifest, edit_model, save_edited_model
    from curvedit.evaluate.runner import EvaluateOptions, load_heldout
    from curvedit.kfac.targets import select_targets
    from curvedit.models import load_model

    given = {"method": method, "seed": seed, "compute_dtype": compute_dtype, "masses": masses,
             "eigh_precision": eigh_precision, "device": device}
    if step_from is not None or step_norm is not None:
        _check_step_flags(step_from, step_norm, rho, keep_fraction, ppl_budget, {
            "--plan": plan_file, "--method": method, "--masses": masses, "--forget": forget, "--side": side,
            "--block": block, "--protect": protect})
        _check_heldout(ppl_budget, heldout)
        check_output(out, kind="dir", overwrite=overwrite, model=model, inputs=[step_from])
        if heldout is not None:
            check_corpus_source(heldout)
        _step_edit(model, factors, out, target_spec(preset, targets, layers), EditRule("*", rho=rho,
                   keep_fraction=keep_fraction), step_from, step_norm, ppl_budget, heldout,
                   settings=_flag_settings(given),
                   budget_steps=budget_steps, batch_size=batch_size,
                   evaluate=EvaluateOptions(heldout=heldout, heldout_seq_len=heldout_seq_len,
                                            heldout_max_tokens=heldout_max_tokens, text_field=text_field),
                   progress=progress, overwrite=overwrite)
        return
    block_shares = _amount_flags(rho, keep_fraction, plan_file, ppl_budget, side, block)
    _check_heldout(ppl_budget, heldout)
    given["masses"] = _forget_masses(forget, masses)
    protect_amount = _protect_amount(protect, protect_rho, protect_keep_fraction, ppl_budget)
    # with --plan the file's settings and the flags are merged first (EditPlan.from_json), then checked
    plan = (replace(EditPlan.from_json(plan_file, **given), protect=protect_amount) if plan_file is not None
            else None)
    settings = plan.settings if plan is not None else _flag_settings(given)
    check_output(out, kind="dir", overwrite=overwrite, model=model,
                 inputs=[p for p in (forget, protect) if p is not None])
    if heldout is not None:
        check_corpus_source(heldout)
    search = None
    if plan is None and ppl_budget is None:
        plan = EditPlan([EditRule("*", rho=rho, keep_fraction=keep_fraction, side=side, block=block_shares)],
                        settings, protect=protect_amount)
    loaded = load_model(model, device=device, progress=progress)
    chosen = select_targets(loaded.model, target_spec(preset, targets, layers))
    forget_windows = read_windows(forget, loaded) if forget is not None else None
    pad_id = default_pad_id(loaded.preprocessor)
    if plan is not None:
        applied = edit_model(loaded.model, chosen, plan, factors, forget=forget_windows, pad_id=pad_id,
                             protect_dir=protect)
    else:
        sequences = load_heldout(loaded, EvaluateOptions(heldout=heldout, heldout_seq_len=heldout_seq_len,
                                                         heldout_max_tokens=heldout_max_tokens,
                                                         text_field=text_field))
        search, applied = edit_within_budget(
            loaded.model, chosen, factors, sequences, budget=ppl_budget, knob=budget_knob, settings=settings,
            forget=forget_windows, protect_dir=protect, steps=budget_steps, batch_size=batch_size, pad_id=pad_id,
            progress=progress)
        if not search.edited:
            typer.echo(search.table(), err=True)
            fail(f"no {budget_knob} below 1 keeps the perplexity within x{ppl_budget:g} of the unedited "
                 f"{search.unedited_perplexity:.4f}; nothing written (raise --ppl-budget or edit fewer targets)")
    manifest = edit_manifest(applied, model, factors, model_source=loaded.source)
    if forget is not None:
        manifest["forget"] = {"path": str(forget), "windows": len(forget_windows)}
    if protect is not None:
        manifest["protect"] = {"factors": str(protect),
                               "amount": "the edit's own" if protect_amount is None else asdict(protect_amount)}
    if search is not None:
        manifest["budget"] = {**search.to_dict(), "heldout": {"path": str(heldout), "seq_len": heldout_seq_len,
                                                              "max_tokens": heldout_max_tokens,
                                                              "sequences": len(sequences)}}
    save_edited_model(loaded.model, loaded.preprocessor, out, manifest, source=model, overwrite=overwrite)
    if search is not None:
        typer.echo(search.table())
    typer.echo(f"{'target':<48} {'kept':>12} {'of':>12} {'mass kept':>10} {'|dW|/|W|':>9}")
    for s in applied.stats:
        typer.echo(f"{s.name:<48} {s.kept:>12} {s.total:>12} {s.mass_kept:>10.4f} {s.rel_change:>9.4f}")
    typer.echo(f"wrote edited model to {out}")


def _check_step_flags(step_from: Optional[Path], step_norm: Optional[float], rho: Optional[float],
                      keep_fraction: Optional[float], ppl_budget: Optional[float], others: dict[str, object]) -> None:
    """The flags of `edit --step-from`: one block amount, one of --step-norm / --ppl-budget,
    and none of the deletion's own flags (`others`, flag -> value)."""
    given = [flag for flag, value in others.items() if value is not None]
    if step_from is None:
        fail("--step-norm is the norm of the --step-from step: give the memorized windows")
    if given:
        fail(f"--step-from takes the block from --rho or --keep-fraction; give it without {', '.join(given)}")
    if (rho is None) == (keep_fraction is None):
        fail("--step-from needs one of --rho or --keep-fraction (the step lives in the components it does not "
             "keep)")
    if (step_norm is None) == (ppl_budget is None):
        fail("--step-from needs one of --step-norm or --ppl-budget (which bisects the norm)")
    if step_norm is not None and not (math.isfinite(step_norm) and step_norm >= 0):
        fail(f"--step-norm must be a finite number >= 0, got {step_norm}")


def _amount_flags(rho: Optional[float], keep_fraction: Optional[float], plan_file: Optional[Path],
                  ppl_budget: Optional[float], side: Optional[str], block: Optional[str]
                  ) -> Optional[tuple[float, ...]]:
    """Exactly one way of saying how much a deletion keeps; returns the --block shares (None without --block)."""
    if ppl_budget is not None and (rho is not None or keep_fraction is not None or plan_file is not None):
        fail("--ppl-budget chooses the amount itself: give it without --rho, --keep-fraction or --plan")
    block_shares = None
    if block is not None:
        try:
            block_shares = tuple(float(v) for v in block.lower().split("x"))
        except ValueError:
            fail(f"--block expects PxQ such as 0.6x0.6, got {block!r}")
        if len(block_shares) != 2 or rho is not None or keep_fraction is not None or plan_file is not None \
                or ppl_budget is not None or side is not None:
            fail("--block PxQ is the whole amount: give it without --rho, --keep-fraction, --plan, --ppl-budget "
                 "or --side")
    if block is None and ppl_budget is None and plan_file is None and (rho is None) == (keep_fraction is None):
        fail("give one of --rho, --keep-fraction, --block or --plan")
    if side is not None and (plan_file is not None or ppl_budget is not None):
        fail("--side shapes a --rho / --keep-fraction rule: give it without --plan or --ppl-budget")
    if plan_file is not None and (rho is not None or keep_fraction is not None):
        fail("--plan gives the amounts: give it without --rho or --keep-fraction")
    return block_shares


def _flag_settings(given: dict[str, Any]) -> EditSettings:
    """The edit settings the flags give; a flag left out keeps `EditSettings`' default."""
    from curvedit.editing.settings import EditSettings

    return EditSettings(**{k: v for k, v in given.items() if v is not None})


def _forget_masses(forget: Optional[Path], masses: Optional[str]) -> Optional[str]:
    """--forget means --masses targeted; the two must not disagree."""
    if forget is not None and masses not in (None, "targeted"):
        fail(f"--forget ranks components by the forget set's masses: give it without --masses {masses}")
    if forget is None and masses == "targeted":
        fail("--masses targeted needs --forget (the memorized windows to target)")
    return "targeted" if forget is not None else masses


def _protect_amount(protect: Optional[Path], protect_rho: Optional[float], protect_keep_fraction: Optional[float],
                    ppl_budget: Optional[float]) -> Optional[EditRule]:
    """The protect selection's own amount (None: the edit's own amount)."""
    from curvedit.editing.edit import EditRule

    if protect is None and (protect_rho is not None or protect_keep_fraction is not None):
        fail("--protect-rho / --protect-keep-fraction set the amount of --protect: give the protect factors")
    if protect_rho is not None and protect_keep_fraction is not None:
        fail("give one of --protect-rho or --protect-keep-fraction")
    amount = (EditRule("*", rho=protect_rho, keep_fraction=protect_keep_fraction)
              if protect_rho is not None or protect_keep_fraction is not None else None)
    if amount is not None and ppl_budget is not None:
        fail("with --ppl-budget the protect amount follows the bisected amount: give --protect alone")
    return amount


def _check_heldout(ppl_budget: Optional[float], heldout: Optional[Path]) -> None:
    """--heldout goes with --ppl-budget, in both directions."""
    if ppl_budget is not None and heldout is None:
        fail("--ppl-budget needs --heldout (held-out text to measure the perplexity on)")
    if ppl_budget is None and heldout is not None:
        fail("--heldout is only read with --ppl-budget")


def _step_edit(model: str, factors: Optional[Path], out: Path, spec: TargetSpec, block: EditRule, step_from: Path,
               step_norm: Optional[float], ppl_budget: Optional[float], heldout: Optional[Path], *,
               settings: EditSettings, budget_steps: int, batch_size: int, evaluate: EvaluateOptions, progress: bool,
               overwrite: bool) -> None:
    """`edit --step-from`: build the coherent step (`curvedit.editing.step`), take it at the given norm
    or the largest within the perplexity budget, and save the model with its manifest."""
    from curvedit.data import default_pad_id
    from curvedit.editing.edit import edit_manifest, method_bases, save_edited_model
    from curvedit.editing.step import apply_step, forget_gradients, step_directions, step_within_budget
    from curvedit.evaluate.runner import load_heldout
    from curvedit.kfac.targets import select_targets
    from curvedit.models import load_model

    if factors is None:
        fail("--step-from needs --factors (the step lives in the K-FAC eigenbasis)")
    loaded = load_model(model, device=settings.device, progress=progress)
    chosen = select_targets(loaded.model, spec)
    windows = read_windows(step_from, loaded)
    pad_id = default_pad_id(loaded.preprocessor)
    bases = method_bases(loaded.model, chosen, factors, settings)
    step = step_directions(forget_gradients(loaded.model, windows, chosen, pad_id=pad_id, batch_size=batch_size),
                           chosen, bases, block)
    search = None
    if ppl_budget is not None:
        sequences = load_heldout(loaded, evaluate)
        step_norm, search = step_within_budget(loaded.model, chosen, step, sequences, budget=ppl_budget,
                                               steps=budget_steps, pad_id=pad_id, batch_size=batch_size,
                                               progress=progress)
        if not search.edited:
            fail(f"no step norm keeps the perplexity within x{ppl_budget:g} (the smallest tried was "
                 f"{(1 - search.steps[-1].amount) * step.deletion_norm:.4g}); nothing written")
    applied = apply_step(chosen, step, step_norm, settings)
    manifest = edit_manifest(applied, model, factors, model_source=loaded.source)
    manifest["step"] = {"from": str(step_from), "windows": len(windows), "norm": step_norm,
                        "deletion_norm": step.deletion_norm, "gradient_share_in_block": step.gradient_share,
                        **({"budget": ppl_budget, "heldout": str(heldout),
                            "bisection": [vars(s) for s in search.steps]} if search is not None else {})}
    save_edited_model(loaded.model, loaded.preprocessor, out, manifest, source=model, overwrite=overwrite)
    typer.echo(f"step of norm {step_norm:.4g} (deleting the block would move {step.deletion_norm:.4g}; "
               f"{step.gradient_share:.1%} of the forget gradient lies in it)")
    typer.echo(f"{'target':<48} {'block':>12} {'of':>12} {'|dW|/|W|':>9}")
    for s in applied.stats:
        typer.echo(f"{s.name:<48} {s.total - s.kept:>12} {s.total:>12} {s.rel_change:>9.4f}")
    typer.echo(f"wrote stepped model to {out}")


def spectrum_command(
    factors: Path = typer.Argument(..., help="Factor directory."),
    rho: Optional[float] = typer.Option(0.6, "--rho", help="Mark this mass fraction on the curves."),
    out: Optional[Path] = out_option("Folder for PNGs (default FACTORS/spectrum).", default=None),
    overwrite: bool = overwrite_option("Replace existing PNGs of these targets in --out."),
) -> None:
    """Plot factor spectra and cumulative curvature mass per target; print a table."""
    from curvedit.kfac.factors import load_factors
    from curvedit.kfac.spectrum import cached_eigenbases, mass_curve, select_by_count, select_by_mass
    from curvedit.plots import plot_spectrum

    if rho is not None and not 0 < rho <= 1:
        fail(f"rho must be in (0, 1], got {rho}")
    loaded = load_factors(factors)
    folder = out or factors / "spectrum"
    check_output(folder, kind="dir", overwrite=overwrite, names=[f"{name}.png" for name in loaded.targets])
    bases = cached_eigenbases(factors, loaded.targets, list(loaded.targets))
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


def register(app: typer.Typer) -> None:
    """Add `edit` and `spectrum` to the `curvedit` app."""
    app.command("edit")(edit_command)
    app.command("spectrum")(spectrum_command)
