"""The `sweep`, `analyze`, `layer-map`, `frontier` and `score` commands (thin layers over
`curvedit.editing.sweep`, `curvedit.diagnostics.analysis`, `curvedit.diagnostics.layer_map`,
`curvedit.diagnostics.frontier` and `curvedit.diagnostics.flat_energy`)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from curvedit.cli.common import (
    BatchSizeOpt,
    DeviceOpt,
    DtypeOpt,
    HeldoutMaxTokensOpt,
    HeldoutSeqLenOpt,
    LayersOpt,
    ProgressOpt,
    TextFieldOpt,
    check_output,
    fail,
    float_list,
    int_list,
    model_option,
    out_option,
    overwrite_option,
    preset_option,
    read_windows,
    resumable,
    target_spec,
    targets_option,
)

ResumeOpt = typer.Option(False, "--resume", help="Continue an interrupted run in --out (its finished points are "
                                                 "read back).")


def _journal(out: Path, name: str, resume: bool) -> Path:
    """The journal of the run in `out`: must exist with --resume; without it a stale one goes
    (check_output let it through only with --overwrite)."""
    path = out / name
    if resume and not path.is_file():
        fail(f"--resume: no unfinished run in {out} (no {name})")
    if not resume:
        path.unlink(missing_ok=True)
    return path


def _groups(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(";") if part.strip())


def _model_windows_heldout(model: str, memorized: Path, heldout: str, *, device: str, dtype: Optional[str],
                           progress: bool, seq_len: int, max_tokens: Optional[int], text_field: str):
    """The model, its memorized windows and the held-out sequences, as sweep, layer-map and
    frontier read them."""
    from curvedit.evaluate.perplexity import heldout_sequences
    from curvedit.models import load_model

    loaded = load_model(model, device=device, dtype=dtype, progress=progress)
    windows = read_windows(memorized, loaded)
    sequences = heldout_sequences(heldout, loaded.preprocessor, seq_len=seq_len, max_tokens=max_tokens,
                                  text_field=text_field)
    return loaded, windows, sequences


def _factor_targets(model, factor_dir: Path, preset: Optional[str], targets: Optional[List[str]],
                    layers: Optional[str]):
    """The targets to analyse: those of the spec when one is given, else every target of the factors."""
    from curvedit.kfac.factors import load_factors
    from curvedit.kfac.targets import TargetError, TargetSpec, select_targets

    if preset or targets or layers:
        return select_targets(model, target_spec(preset, targets, layers))
    names = set(load_factors(factor_dir).targets)
    chosen = [t for t in select_targets(model, TargetSpec()) if t.name in names]
    if not chosen:
        shown = ", ".join(sorted(names)[:4])
        raise TargetError(f"{factor_dir}: no factor target ({shown}, ...) is a module of this model")
    return chosen


def sweep_command(
    model: str = model_option("HF model name or local directory (unedited)."),
    factors: Optional[Path] = typer.Option(None, "--factors", "-f", help="Factor directory (not needed for svd)."),
    layers_grid: str = typer.Option(..., "--layers-grid", help="Layer groups separated by ';', e.g. '1-2;2-3;3'."),
    matrices: str = typer.Option("mlp-in", "--matrices", help="Presets or patterns separated by ';' "
                                                              "(mlp-in, mlp, mlp-out, '*.up_proj', ...)."),
    rho_grid: Optional[str] = typer.Option(None, "--rho-grid", help="Mass fractions to keep, e.g. 0.6,0.75,0.9."),
    keep_grid: Optional[str] = typer.Option(None, "--keep-grid", help="Component fractions to keep, e.g. 0.3,0.5."),
    method: str = typer.Option("kfac", "--method", help="kfac, svd, random, lowest or identity (with --masses "
                                                        "saliency: magnitude pruning)."),
    memorized: Path = typer.Option(..., "--memorized", help="Memorized-windows JSONL (find-memorized)."),
    heldout: str = typer.Option(..., "--heldout", help="Held-out corpus for perplexity."),
    out: Path = out_option("Folder for sweep.json and sweep.png."),
    ppl_budget: float = typer.Option(1.1, "--ppl-budget", help="Chosen point: perplexity at most this x unedited."),
    bisect_budget: bool = typer.Option(
        False, "--bisect-budget", help="Instead of --rho-grid/--keep-grid: one point per layers x matrices cell, at "
                                       "the strongest edit within --ppl-budget (bisected)."),
    budget_knob: str = typer.Option("keep_fraction", "--budget-knob", help="What --bisect-budget bisects: "
                                                                           "keep_fraction or rho."),
    budget_steps: int = typer.Option(10, "--budget-steps", help="Bisection steps per cell (resolution 2^-steps)."),
    metric: str = typer.Option("loose", "--metric", help="Memorization to minimise: loose, strict or similarity."),
    tasks: Optional[Path] = typer.Option(None, "--tasks", help="Task probes scored at every point (a folder of "
                                                                "task files, e.g. from `curvedit capabilities`)."),
    protect: Optional[Path] = typer.Option(None, "--protect", help="Protect factors (see edit --protect): every "
                                                                    "point also keeps their top mass at its amount."),
    probe_floor: Optional[list[str]] = typer.Option(
        None, "--probe-floor", help="The chosen point must keep at least this share of the unedited accuracy in "
                                    "every probe family the unedited model gets clearly above chance (0.7), or in "
                                    "one family (open_book=0.9; repeatable; with FAMILY= only, the families "
                                    "not named are not held)."),
    heldout_seq_len: int = HeldoutSeqLenOpt,
    heldout_max_tokens: Optional[int] = HeldoutMaxTokensOpt,
    loose_threshold: float = typer.Option(0.75, "--loose-threshold"),
    batch_size: int = BatchSizeOpt,
    seed: int = typer.Option(0, "--seed", help="Seed of the random control."),
    masses: str = typer.Option("kfac", "--masses", help="Component ranking: kfac, ekfac (needs collect "
                                                        "--eigencorrect) or saliency (lam_i mu_j C_ij^2)."),
    text_field: str = TextFieldOpt,
    device: str = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    overwrite: bool = overwrite_option("Replace sweep.json and sweep.png in --out."),
    resume: bool = ResumeOpt,
    progress: bool = ProgressOpt,
) -> None:
    """Sweep layers x matrices x amounts in memory; write all points, the Pareto front and the chosen point.

    With --bisect-budget the amounts are not a grid: each layers x matrices cell is bisected
    to the strongest edit within --ppl-budget, and its steps are recorded in sweep.json.
    """
    from curvedit.data import check_corpus_source
    from curvedit.editing.settings import EditSettings
    from curvedit.editing.sweep import (
        SWEEP_JOURNAL,
        SWEEP_JSON,
        SWEEP_PNG,
        SweepGrid,
        SweepOptions,
        parse_probe_floor,
        run_sweep,
    )
    from curvedit.evaluate.tasks import load_tasks

    grid = SweepGrid(layers=_groups(layers_grid), matrices=_groups(matrices), rho=float_list(rho_grid, "--rho-grid"),
                     keep_fraction=float_list(keep_grid, "--keep-grid"))
    options = SweepOptions(metric=metric, ppl_budget=ppl_budget, loose_threshold=loose_threshold,
                           batch_size=batch_size, settings=EditSettings(method=method, masses=masses, seed=seed,
                                                                        device=device), progress=progress,
                           bisect_budget=bisect_budget, bisect_knob=budget_knob, bisect_steps=budget_steps,
                           probe_floor=parse_probe_floor(probe_floor or []))
    grid.validate(bisect=bisect_budget)
    options.validate()
    if probe_floor and tasks is None:
        fail("--probe-floor needs --tasks (the probe families it holds)")
    probe_tasks = load_tasks(tasks) if tasks is not None else []
    check_output(out, kind="dir", overwrite=overwrite, model=model, names=(SWEEP_JSON, SWEEP_PNG, SWEEP_JOURNAL),
                 state=(SWEEP_JOURNAL,), resume=resume)
    journal = _journal(out, SWEEP_JOURNAL, resume)
    check_corpus_source(heldout)
    loaded, windows, heldout_seqs = _model_windows_heldout(
        model, memorized, heldout, device=device, dtype=dtype, progress=progress, seq_len=heldout_seq_len,
        max_tokens=heldout_max_tokens, text_field=text_field)
    with resumable(out, "every finished point"):
        result = run_sweep(loaded.model, loaded.preprocessor, factors, grid, windows, heldout_seqs, options,
                           tasks=probe_tasks, protect_dir=protect, journal=journal)
    paths = result.write(out)
    base = result.baseline
    typer.echo(f"{'point':<44} {'strict':>7} {'loose':>7} {'dist':>7} {'ppl':>9} {'kept':>7}  front")
    typer.echo(f"{'unedited':<44} {base.strict:>7.3f} {base.loose:>7.3f} {base.avg_normalized_distance:>7.3f} "
               f"{base.perplexity:>9.3f} {'':>7}")
    front = set(result.front)
    for index, p in enumerate(result.points):
        mark = ("*" if index in front else "") + (" chosen" if index == result.chosen else "")
        typer.echo(f"{p.label:<44} {p.strict:>7.3f} {p.loose:>7.3f} {p.avg_normalized_distance:>7.3f} "
                   f"{p.perplexity:>9.3f} {p.kept / max(p.total, 1):>7.3f}  {mark}")
    if probe_tasks:
        typer.echo("probe accuracy, unedited: " + ", ".join(f"{k} {v:.0%}" for k, v in base.probes.items())
                   + f"; usable: {', '.join(result.usable_probes) or 'none'}")
    for p in result.points:
        if p.excluded:
            typer.echo(f"excluded {p.label}: {p.excluded}")
    if result.chosen is None:
        floor = f" and the probe floor {' '.join(probe_floor)}" if probe_floor else ""
        typer.echo(f"no point within the perplexity budget x{ppl_budget:g} ({ppl_budget * base.perplexity:.3f})"
                   + floor)
    typer.echo(f"wrote {paths[0]} and {paths[1]}")


def analyze_command(
    model: str = model_option("HF model name or local directory (unedited)."),
    factors: Path = typer.Option(..., "--factors", "-f", help="Factor directory."),
    memorized: Path = typer.Option(..., "--memorized", help="Memorized-windows JSONL (find-memorized)."),
    clean: str = typer.Option(..., "--clean", help="Clean corpus (text / input_ids JSONL, .txt, folder)."),
    out: Path = out_option("Folder for bands.json and the per-layer PNGs."),
    preset: Optional[str] = preset_option("Target preset [default: every factor target]."),
    targets: Optional[List[str]] = targets_option(),
    layers: Optional[str] = LayersOpt,
    bands: str = typer.Option("0.1,0.25,0.5", "--bands", help="Band edges as fractions of the ordered basis."),
    positions: str = typer.Option("suffix", "--positions", help="Memorized positions counted: suffix or all."),
    clean_seq_len: int = typer.Option(512, "--clean-seq-len", help="Sequence length for packing the clean corpus."),
    clean_max_tokens: Optional[int] = typer.Option(100_000, "--clean-max-tokens"),
    family: Optional[List[str]] = typer.Option(None, "--family", help="Task family NAME=prompts.jsonl (repeatable)."),
    drops: Optional[Path] = typer.Option(None, "--drops", help="JSON {family: accuracy drop after the edit}."),
    batch_size: int = BatchSizeOpt,
    text_field: str = TextFieldOpt,
    device: str = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    overwrite: bool = overwrite_option("Replace the analysis files in --out."),
    progress: bool = ProgressOpt,
) -> None:
    """Mean |v^T x| per curvature band, memorized vs clean, in the K-FAC and the SVD basis."""
    from curvedit.data import check_corpus_source, default_pad_id
    from curvedit.diagnostics.analysis import (
        BANDS_JSON,
        FAMILIES_JSON,
        FAMILIES_PNG,
        BandOptions,
        band_analysis,
        read_drops,
        read_prompts,
        task_family_shares,
        write_task_families,
    )
    from curvedit.evaluate.perplexity import heldout_sequences
    from curvedit.evaluate.windows import read_memorized
    from curvedit.kfac.spectrum import load_bases
    from curvedit.models import load_model

    families: dict[str, Path] = {}
    for item in family or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            fail(f"--family expects NAME=FILE, got {item!r}")
        families[name] = Path(path)
    if drops is not None and not families:
        fail("--drops needs at least one --family")
    options = BandOptions(edges=float_list(bands, "--bands"), positions=positions, batch_size=batch_size,
                          progress=progress)
    options.validate()
    check_output(out, kind="dir", overwrite=overwrite, model=model,
                 names=(BANDS_JSON, "bands_*.png", FAMILIES_JSON, FAMILIES_PNG))
    check_corpus_source(clean)
    loaded = load_model(model, device=device, dtype=dtype, progress=progress)
    tokenizer = loaded.preprocessor
    chosen = _factor_targets(loaded.model, factors, preset, targets, layers)
    bases = load_bases(chosen, factors)
    windows = read_memorized(memorized, tokenizer)
    clean_seqs = heldout_sequences(clean, tokenizer, seq_len=clean_seq_len, max_tokens=clean_max_tokens,
                                   text_field=text_field)
    pad_id = default_pad_id(tokenizer)
    analysis = band_analysis(loaded.model, chosen, bases, windows, clean_seqs, options, pad_id=pad_id)
    written = analysis.write(out)
    if families:
        prompts = {name: read_prompts(path, tokenizer, text_field=text_field) for name, path in families.items()}
        shares = task_family_shares(loaded.model, chosen, bases, prompts,
                                    read_drops(drops) if drops is not None else None, options, pad_id=pad_id)
        written += write_task_families(shares, out)
    labels = [b.band for b in analysis.targets[0].kfac]
    typer.echo(f"memorized/clean ratio per band ({analysis.memorized_positions} memorized, "
               f"{analysis.clean_positions} clean positions)")
    typer.echo(f"{'target':<40} {'basis':<5} " + " ".join(f"{label:>8}" for label in labels))
    for target in analysis.targets:
        for basis, rows in (("kfac", target.kfac), ("svd", target.svd)):
            typer.echo(f"{target.name:<40} {basis:<5} " + " ".join(f"{b.ratio:>8.3f}" for b in rows))
    typer.echo(f"wrote {len(written)} files to {out}")


def layer_map_command(
    model: str = model_option("HF model name or local directory (unedited)."),
    factors: Path = typer.Option(..., "--factors", "-f", help="Factor directory covering every block's matrices."),
    memorized: Path = typer.Option(..., "--memorized", help="Memorized windows (the tune half)."),
    heldout: str = typer.Option(..., "--heldout", help="Held-out corpus for perplexity."),
    out: Path = out_option("Folder for layer_map.json and layer_map.png."),
    matrices: str = typer.Option("mlp-in", "--matrices", help="Preset or pattern edited in each placement."),
    keep_fraction: float = typer.Option(0.9, "--keep-fraction", help="The fixed small edit: share kept."),
    group_sizes: str = typer.Option("1,3", "--group-sizes", help="Placements of this many consecutive blocks."),
    tasks: Optional[Path] = typer.Option(None, "--tasks", help="Probe task files (costs in probe points too)."),
    heldout_seq_len: int = HeldoutSeqLenOpt,
    heldout_max_tokens: Optional[int] = HeldoutMaxTokensOpt,
    batch_size: int = BatchSizeOpt,
    text_field: str = TextFieldOpt,
    device: str = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    overwrite: bool = overwrite_option("Replace layer_map files in --out."),
    resume: bool = ResumeOpt,
    progress: bool = ProgressOpt,
) -> None:
    """Where to cut: the same small edit at every block and run of blocks, alone; forgetting per unit of cost."""
    from curvedit.data import check_corpus_source
    from curvedit.diagnostics.layer_map import (
        LAYER_MAP_JOURNAL,
        LAYER_MAP_JSON,
        LAYER_MAP_PNG,
        LayerMapOptions,
        layer_map,
    )
    from curvedit.evaluate.tasks import load_tasks

    options = LayerMapOptions(matrices=matrices, keep_fraction=keep_fraction,
                              group_sizes=int_list(group_sizes, "--group-sizes"), batch_size=batch_size,
                              progress=progress)
    options.validate()
    probe_tasks = load_tasks(tasks) if tasks is not None else []
    check_output(out, kind="dir", overwrite=overwrite, model=model,
                 names=(LAYER_MAP_JSON, LAYER_MAP_PNG, LAYER_MAP_JOURNAL), state=(LAYER_MAP_JOURNAL,), resume=resume)
    journal = _journal(out, LAYER_MAP_JOURNAL, resume)
    check_corpus_source(heldout)
    loaded, windows, sequences = _model_windows_heldout(
        model, memorized, heldout, device=device, dtype=dtype, progress=progress, seq_len=heldout_seq_len,
        max_tokens=heldout_max_tokens, text_field=text_field)
    with resumable(out, "every finished placement"):
        result = layer_map(loaded.model, loaded.preprocessor, factors, windows, sequences, options, tasks=probe_tasks,
                           journal=journal)
    paths = result.write(out)
    typer.echo(f"{'blocks':<10} {'forgetting':>10} {'ppl rise':>9} {'per ppl':>9} {'probe pts':>9}")
    for p in result.placements:
        lost = "-" if p.probe_points_lost is None else f"{p.probe_points_lost:.1f}"
        typer.echo(f"{p.layers:<10} {p.forgetting:>10.3f} {p.ppl_rise:>9.4f} {p.per_ppl:>9.2f} {lost:>9}")
    typer.echo(f"wrote {paths[0]} and {paths[1]}")


def frontier_command(
    model: str = model_option("HF model name or local directory (unedited)."),
    factors: Optional[Path] = typer.Option(None, "--factors", "-f", help="Factor directory (not needed for "
                                                                          "magnitude and svd alone)."),
    memorized: Path = typer.Option(..., "--memorized", help="Held-out memorized windows (not the ones an amount "
                                                            "was chosen on)."),
    heldout: str = typer.Option(..., "--heldout", help="Held-out general corpus (the cost in nats per token)."),
    out: Path = out_option("Folder for frontier.json and frontier.png."),
    preset: Optional[str] = preset_option("Target preset [default: mlp-in]."),
    targets: Optional[List[str]] = targets_option(),
    layers: Optional[str] = LayersOpt,
    methods: str = typer.Option(",".join(("kfac", "saliency", "magnitude", "noise", "random", "svd")), "--methods",
                                help="Comma-separated: kfac, saliency, magnitude, noise, random, svd."),
    keep_grid: str = typer.Option("0.99,0.95,0.9,0.8,0.6,0.4", "--keep-grid", help="Keep fractions, each in (0, 1)."),
    tasks: Optional[Path] = typer.Option(None, "--tasks", help="Probe task files (cost in probe points too)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random and noise controls."),
    heldout_seq_len: int = HeldoutSeqLenOpt,
    heldout_max_tokens: Optional[int] = HeldoutMaxTokensOpt,
    batch_size: int = BatchSizeOpt,
    text_field: str = TextFieldOpt,
    device: str = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    overwrite: bool = overwrite_option("Replace frontier files in --out."),
    resume: bool = ResumeOpt,
    progress: bool = ProgressOpt,
) -> None:
    """Is curvature the lever? Held-out forgetting against cost (nats per token) for every method, on one figure."""
    from curvedit.data import check_corpus_source
    from curvedit.diagnostics.frontier import (
        FRONTIER_JOURNAL,
        FRONTIER_JSON,
        FRONTIER_PNG,
        FrontierOptions,
        run_frontier,
    )
    from curvedit.editing.settings import EditSettings
    from curvedit.evaluate.tasks import load_tasks
    from curvedit.kfac.targets import select_targets

    options = FrontierOptions(methods=_groups(methods.replace(",", ";")),
                              keep_fractions=tuple(float_list(keep_grid, "--keep-grid")),
                              settings=EditSettings(seed=seed),
                              batch_size=batch_size, progress=progress)
    options.validate()
    if factors is None and set(options.methods) - {"magnitude", "svd"}:
        fail("--factors is needed for every method but magnitude and svd")
    probe_tasks = load_tasks(tasks) if tasks is not None else []
    check_output(out, kind="dir", overwrite=overwrite, model=model,
                 names=(FRONTIER_JSON, FRONTIER_PNG, FRONTIER_JOURNAL), state=(FRONTIER_JOURNAL,), resume=resume)
    journal = _journal(out, FRONTIER_JOURNAL, resume)
    check_corpus_source(heldout)
    loaded, windows, sequences = _model_windows_heldout(
        model, memorized, heldout, device=device, dtype=dtype, progress=progress, seq_len=heldout_seq_len,
        max_tokens=heldout_max_tokens, text_field=text_field)
    chosen = select_targets(loaded.model, target_spec(preset or ("mlp-in" if not targets else None), targets, layers))
    with resumable(out, "every finished point"):
        result = run_frontier(loaded.model, loaded.preprocessor, factors, chosen, windows, sequences, options,
                              tasks=probe_tasks, journal=journal)
    paths = result.write(out)
    typer.echo(result.table())
    typer.echo(f"wrote {paths[0]} and {paths[1]}")


def score_command(
    model: str = model_option("HF model name or local directory (the factors' model)."),
    factors: Path = typer.Option(..., "--factors", "-f", help="Factor directory."),
    data: str = typer.Option(..., "--data", "-d", help="Text to score (JSONL text or input_ids, .txt, folder)."),
    out: Path = out_option("JSONL of scores: {index, score, tokens} per sequence."),
    flat_fraction: float = typer.Option(0.5, "--flat-fraction", help="Share of A's eigenvectors, from the "
                                                                       "flattest, that count as flat."),
    seq_len: int = typer.Option(112, "--seq-len", help="Sequence length for packing text."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens"),
    preset: Optional[str] = preset_option("Target preset [default: every factor target]."),
    targets: Optional[List[str]] = targets_option(),
    layers: Optional[str] = LayersOpt,
    batch_size: int = BatchSizeOpt,
    text_field: str = TextFieldOpt,
    device: str = DeviceOpt,
    overwrite: bool = overwrite_option("Replace an existing --out file."),
    progress: bool = ProgressOpt,
) -> None:
    """Label-free: each sequence's share of input activation energy in the flattest directions of A."""
    from curvedit.data import check_corpus_source, default_pad_id, read_records, token_sequences, write_jsonl
    from curvedit.diagnostics.flat_energy import flat_directions, flat_energy_shares
    from curvedit.kfac.spectrum import load_bases
    from curvedit.models import load_model

    if not 0 < flat_fraction < 1:
        fail(f"--flat-fraction must be in (0, 1), got {flat_fraction}")
    check_output(out, kind="file", overwrite=overwrite, model=model, inputs=[data])
    check_corpus_source(data)
    loaded = load_model(model, device=device, progress=progress)
    chosen = _factor_targets(loaded.model, factors, preset, targets, layers)
    bases = load_bases(chosen, factors)
    for basis in bases.values():
        flat_directions(basis, flat_fraction)
    sequences = [s for s in token_sequences(read_records(data, text_field=text_field), loaded.preprocessor, seq_len,
                                            max_tokens) if s]
    if not sequences:
        fail(f"{data}: no text to score")
    scores = flat_energy_shares(loaded.model, chosen, bases, sequences, flat_fraction=flat_fraction,
                                batch_size=batch_size, pad_id=default_pad_id(loaded.preprocessor))
    write_jsonl(({"index": i, "score": s, "tokens": len(q)} for i, (s, q) in enumerate(zip(scores, sequences))),
                out, overwrite=True)
    typer.echo(f"scored {len(scores)} sequences (mean flat-energy share {sum(scores) / len(scores):.4f}); "
               f"wrote {out}")


def register(app: typer.Typer) -> None:
    """Add `sweep`, `analyze`, `layer-map`, `frontier` and `score` to the `curvedit` app."""
    app.command("score")(score_command)
    app.command("sweep")(sweep_command)
    app.command("analyze")(analyze_command)
    app.command("layer-map")(layer_map_command)
    app.command("frontier")(frontier_command)
