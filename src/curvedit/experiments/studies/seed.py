"""Every stage of one implant seed: implant, find, collect, sweep, then every variant
measured, each stage recorded under the key of what it depends on (`ImplantedSeed` makes the
model and factors only when a stage has to run).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from curvedit.data import lm_batches
from curvedit.diagnostics.frontier import FRONTIER_JOURNAL, FrontierOptions, run_frontier
from curvedit.diagnostics.layer_map import LAYER_MAP_JOURNAL, middle_three
from curvedit.editing.balanced_subnet import BSNOptions, bsn_within_budget
from curvedit.editing.budget import bisect_amount, bisect_edit, match_tolerance
from curvedit.editing.edit import EditPlan, EditRule, apply_edit
from curvedit.editing.step import apply_step, step_at_cost
from curvedit.editing.sweep import (
    SWEEP_JOURNAL,
    SweepGrid,
    SweepOptions,
    SweepPoint,
    choose_point,
    family_floor,
    floor_map,
    matrices_spec,
    run_sweep,
)
from curvedit.evaluate.memorization import evaluate_recitation
from curvedit.evaluate.windows import Window
from curvedit.experiments.stages import Timer, cached, content_key
from curvedit.experiments.studies.base import PROBE_SEED, StudyData, study_tasks
from curvedit.experiments.studies.beyond import BEYOND, beyond_paper
from curvedit.experiments.studies.canary_stage import (
    factor_sequences,
    find_canaries,
    nonmember_canaries,
    split_halves,
    style_of,
)
from curvedit.experiments.studies.capability_stages import (
    family_texts,
    protect_bands,
    protected_bases,
    run_layer_map,
    style_energy,
    variant_name,
)
from curvedit.experiments.studies.implanted import ImplantedSeed
from curvedit.experiments.studies.measure import (
    SeedProbe,
    edit_and_measure,
    measure,
    perplexity_after,
    run_band_analysis,
)
from curvedit.experiments.studies.options import FACTOR_DATA, StudyError, StudyOptions
from curvedit.experiments.studies.variant_kit import VariantKit
from curvedit.kfac.collect import CollectOptions, collect_factors
from curvedit.kfac.factors import save_factors
from curvedit.kfac.spectrum import load_bases
from curvedit.kfac.targets import select_targets
from curvedit.memorize.implant import canary_token_ids
from curvedit.models import restored

BEYOND_RECORD, LAYER_MAP_RECORD, FRONTIER_RECORD = "beyond.json", "layer_map.json", "frontier.json"
BEYOND_RECORDS = (BEYOND_RECORD, LAYER_MAP_RECORD, FRONTIER_RECORD)  # the records only the beyond seeds hold
LAYER_MAP_PROBE_ITEMS = 10  # per family: the layer map scores each of its placements on a short suite


def sweep_key_fields(sweep: Any, probe_tasks: list[Any] | None) -> dict[str, Any]:
    """The sweep options as the sweep's cache key holds them: flat, with the edit settings'
    seed, dtype and device beside the other fields (as sweeps cached before `EditSettings`
    were keyed), and with only what differs from the defaults for the later fields (masses,
    eigh precision, probe floor and margin), so those caches stay valid.

    Args:
        sweep: the `SweepOptions`.
        probe_tasks: [items, held families] when a probe floor is held, else None.

    Returns:
        The dict the key is computed from.
    """
    fields_kept = {k: v for k, v in asdict(sweep).items() if k not in ("progress", "settings")}
    settings = sweep.settings
    fields_kept |= {"progress": 0, "seed": settings.seed, "compute_dtype": settings.compute_dtype,
                    "device": settings.device}
    if settings.masses != "kfac":
        fields_kept["masses"] = settings.masses
    if settings.eigh_precision != "float64":
        fields_kept["eigh_precision"] = settings.eigh_precision
    for default_off in ("probe_floor", "probe_margin"):
        if fields_kept[default_off] == getattr(SweepOptions(), default_off):
            fields_kept.pop(default_off)
    if probe_tasks is not None:
        fields_kept["probe_tasks"] = probe_tasks
    return fields_kept


def held_floor(probe_floor: float | dict[str, float] | None, usable: Sequence[str]) -> dict[str, float] | None:
    """The floor the study's sweep applies: each usable family that has a share (its own, or
    "*"'s) at that share; None when no usable family has one."""
    floor = floor_map(probe_floor)
    return {f: share for f in usable if (share := family_floor(floor, f))} or None


def budget_choice(swept: dict[str, Any], budget: float) -> int | None:
    """The sweep's choice by memorization and perplexity alone (no probe floor), from its
    JSON form (`curvedit.editing.sweep.SweepResult.to_dict`)."""
    points = [SweepPoint(**{f.name: p[f.name] for f in fields(SweepPoint)}) for p in swept["points"]]
    return choose_point(points, swept["baseline"]["perplexity"], budget, swept["options"]["metric"])


def matched_control(model: Any, tokenizer: Any, targets: list[Any], bases: dict[str, Any], method: str,
                    kfac_ppl: float, unedited_ppl: float, probe: SeedProbe, reference: Any, options: StudyOptions,
                    pad_id: int, seed: int) -> dict[str, Any]:
    """A control (`method` "random" or "svd") bisected to K-FAC's perplexity, then measured.

    Returns:
        The variant's measurements with the match and a note.
    """
    settings = replace(options.edit, method=method, seed=seed)
    search = bisect_amount(model, targets, bases, probe.ppl_text, mode="match", target_ppl=kfac_ppl,
                           unedited_ppl=unedited_ppl, settings=settings,
                           steps=options.bisect_steps + (7 if method == "svd" else 2),  # SVD is steep near 1
                           tolerance=match_tolerance(kfac_ppl, unedited_ppl), batch_size=options.batch_size,
                           pad_id=pad_id)
    plan = EditPlan([search.rule()], settings)
    return edit_and_measure(model, tokenizer, targets, bases, plan, probe, reference, options) | {
        "matched": search.to_dict(), "note": f"{method} at K-FAC's perplexity ({search.perplexity:.4f} vs "
                                             f"{kfac_ppl:.4f})"}


def bsn_variant(model: Any, tokenizer: Any, targets: list[Any], data: StudyData, probe: SeedProbe, reference: Any,
                options: StudyOptions, unedited_ppl: float, pad_id: int, seed: int) -> dict[str, Any]:
    """BalancedSubnet trained on the tune half, its ratio chosen within the perplexity budget;
    measured, then the weights are restored.

    Returns:
        The variant's measurements with the choice and a note.
    """
    forget = [w.prefix_ids + w.suffix_ids for w in probe.tune]
    retain = data.train[: max(4 * len(forget), 32)]
    bsn_options = BSNOptions(epochs=options.bsn_epochs, lr=options.bsn_lr, seed=seed, batch_size=16,
                             progress=options.progress)
    with restored(model, [t.module.weight for t in targets]):
        choice = bsn_within_budget(model, targets, forget, retain, probe.tune, probe.ppl_text, options.bsn_ratios,
                                   options.ppl_budget * unedited_ppl, bsn_options, pad_id=pad_id,
                                   batch_size=options.batch_size)
        metrics = measure(model, tokenizer, probe, reference, options)
    return metrics | {"bsn": asdict(choice), "note": f"BalancedSubnet on the tune half, ratio {choice.ratio}"}


def other_factors_variant(model: Any, tokenizer: Any, targets: list[Any], data: StudyData, kind: str, folder: Path,
                          model_key: str, probe: SeedProbe, reference: Any, options: StudyOptions,
                          unedited_ppl: float, pad_id: int, seed: int) -> dict[str, Any]:
    """K-FAC at the chosen placement with factors collected on other text (`FACTOR_DATA[kind]`,
    the same token count), bisected to the same budget, then measured.

    Returns:
        The variant's measurements with the bisection and a note.
    """
    text = factor_sequences(model, tokenizer, data, replace(options, factor_data=kind), seed, model_key)
    other_dir = folder / f"factors-{kind}"  # in the seed's cache
    save_factors(collect_factors(model, lm_batches(text, options.factor_batch, pad_id), targets, options=(
        CollectOptions(seed=seed, progress=options.progress, total_tokens=sum(len(t) for t in text),
                       description=FACTOR_DATA[kind]))), other_dir)
    tokens = sum(len(t) for t in text)
    other_bases = load_bases(targets, other_dir, options.edit.device, options.edit.eigh_precision)
    return within_budget_variant(model, tokenizer, targets, other_bases, probe, reference, options,
                                 unedited_ppl, pad_id, lambda amount: (
                                     f"K-FAC at the chosen placement with factors on {FACTOR_DATA[kind]} ({tokens} "
                                     f"tokens), keep {amount:.3f} within {options.ppl_budget}x"))


def paper_placement(model: Any, tokenizer: Any, factor_dir: Path, paper_layers: str, probe: SeedProbe,
                    reference: Any, options: StudyOptions, unedited_ppl: float, pad_id: int) -> dict[str, Any]:
    """The paper's kind of placement: K-FAC on gate/up of `paper_layers` only, bisected to the
    study's perplexity budget, then measured like every variant.

    Returns:
        The variant's measurements with its bisection and a note.
    """
    paper_targets = select_targets(model, matrices_spec("mlp-in", paper_layers))
    paper_bases = load_bases(paper_targets, factor_dir, options.edit.device, options.edit.eigh_precision)
    return within_budget_variant(model, tokenizer, paper_targets, paper_bases, probe,
                                 reference, options, unedited_ppl, pad_id, lambda amount: (
                                     f"K-FAC on gate/up of blocks {paper_layers} only, keep {amount:.3f} within "
                                     f"{options.ppl_budget}x perplexity"))


def within_budget_variant(model: Any, tokenizer: Any, targets: list[Any], bases: dict[str, Any], probe: SeedProbe,
                          reference: Any, options: StudyOptions, unedited_ppl: float, pad_id: int,
                          note: Callable[[float], str]) -> dict[str, Any]:
    """K-FAC on `targets` with `bases`, its amount bisected to the study's perplexity budget on
    the probe's perplexity text, then measured like every variant.

    Returns:
        The variant's measurements with its bisection and `note(amount)`.
    """
    search = bisect_amount(model, targets, bases, probe.ppl_text, mode="within", budget=options.ppl_budget,
                           unedited_ppl=unedited_ppl, steps=options.bisect_steps, batch_size=options.batch_size,
                           pad_id=pad_id, settings=options.edit)
    plan = EditPlan([search.rule()], options.edit)
    return edit_and_measure(model, tokenizer, targets, bases, plan, probe, reference, options) | {
        "bisection": search.to_dict(), "note": note(search.amount)}


def band_protection(model: Any, tokenizer: Any, targets: list[Any], bases: dict[str, Any], families: list[str],
                    options: StudyOptions, pad_id: int, seed: int) -> tuple[dict[str, Any], int]:
    """Copies of `bases` carrying the protect masses of factors collected on a band's items.

    The protect texts are in-sample: a fact family is its whole list, and 1-digit arithmetic
    has fewer items than the probes take; 2-digit arithmetic draws other items from the same
    seeds' stream.

    Returns:
        (the protected bases, the number of protect texts).
    """
    texts = family_texts(tokenizer, families, options.protect_items, seed=PROBE_SEED + 7)
    return protected_bases(model, bases, targets, texts, pad_id=pad_id, seed=seed), len(texts)


def protected_variant(model: Any, tokenizer: Any, targets: list[Any], protection: tuple[dict[str, Any], int],
                      kfac_plan: EditPlan, band: str, families: list[str], probe: SeedProbe, reference: Any,
                      options: StudyOptions, pad_id: int, match_tune_loose: float | None = None) -> dict[str, Any]:
    """K-FAC with one capability band protected (`edit --protect`): at the chosen amount, or,
    with `match_tune_loose`, at the keep fraction whose tune-half loose recall matches K-FAC's
    (the same removal on the half the edit was chosen on; the held-out half stays unseen).
    `protection` is the band's protected bases and protect-text count (`band_protection`).

    Returns:
        The variant's measurements with a note and what was protected (and, matched, the
        bisection of the keep fraction).
    """
    copies, items = protection
    protected = {"protected": {"band": band, "families": families, "items": items}}
    if match_tune_loose is None:
        return edit_and_measure(model, tokenizer, targets, copies, kfac_plan, probe, reference, options) | {
            "note": f"K-FAC at the chosen amount with {band} protected", **protected}
    matched = match_recall(
        lambda amount: apply_edit(targets, EditPlan([EditRule(keep_fraction=amount)], options.edit), copies),
        lambda: evaluate_recitation(model, probe.tune, pad_id=pad_id, batch_size=options.batch_size)[0].loose,
        match_tune_loose, options.bisect_steps)
    plan = EditPlan([EditRule(keep_fraction=matched["amount"])], options.edit)
    reached = matched["reached"]
    return edit_and_measure(model, tokenizer, targets, copies, plan, probe, reference, options) | {
        "note": (f"K-FAC with {band} protected, keep {matched['amount']:.3f} bisected to K-FAC's tune-half loose "
                 f"recall ({match_tune_loose:.3f}; reached {'-' if reached is None else f'{reached:.3f}'})"),
        "matched_tune": matched, **protected}


def strict_variant(model: Any, tokenizer: Any, targets: list[Any], bases: dict[str, Any], label: str,
                   probe: SeedProbe, reference: Any, options: StudyOptions, pad_id: int) -> dict[str, Any]:
    """An edit (K-FAC, or one with a band protected: `bases` carries the protect masses) at the
    least amount that brings the tune half's strict recall down to `options.protect_strict`:
    the keep fraction bisected to the largest that reaches it, then measured (held-out
    canaries unseen by the search).

    Returns:
        The variant's measurements with the bisection (`strict_tune`) and a note; when no
        candidate reached the bound, the strongest one tried, and the note says so.
    """
    bound = options.protect_strict

    def apply(amount: float) -> Any:
        return apply_edit(targets, EditPlan([EditRule(keep_fraction=amount)], options.edit), bases)

    found = bisect_edit(apply, lambda: -evaluate_recitation(model, probe.tune, pad_id=pad_id,
                                                            batch_size=options.batch_size)[0].strict,
                        -bound, mode="least", gap=lambda value: abs(value + bound), steps=options.bisect_steps + 2)
    amount = found.amount if found.edited else min(s.amount for s in found.steps)
    plan = EditPlan([EditRule(keep_fraction=amount)], options.edit)
    search = {"bound": bound, "amount": amount, "reached": found.edited,
              "steps": [{"amount": s.amount, "strict": -s.value} for s in found.steps]}
    return edit_and_measure(model, tokenizer, targets, bases, plan, probe, reference, options) | {
        "note": (f"{label}, keep {amount:.4f}: the largest whose tune-half strict recall is at most {bound:.0%}"
                 if found.edited else f"{label}: no keep fraction tried reached tune-half strict recall "
                 f"{bound:.0%}; the strongest tried ({amount:.4f})"), "strict_tune": search}


def step_variant(model: Any, tokenizer: Any, targets: list[Any], bases: dict[str, Any], kfac_plan: EditPlan,
                 kfac_ppl: float, unedited_ppl: float, probe: SeedProbe, reference: Any, options: StudyOptions,
                 pad_id: int) -> dict[str, Any]:
    """A coherent step from the tune half (`edit --step-from`, `curvedit.editing.step`) in the
    block the chosen K-FAC edit deletes, at the largest norm (up to 4x the deletion's) within
    K-FAC's perplexity, measured on the held-out canaries it never saw.

    Returns:
        The variant's measurements with the step's norm, the deletion's norm, the share of the
        forget gradient inside the block, and a note.
    """
    step, norm, search = step_at_cost(model, targets, bases, kfac_plan.rules[0], probe.tune, probe.ppl_text,
                                      budget=kfac_ppl / unedited_ppl, unedited_ppl=unedited_ppl,
                                      steps=options.bisect_steps + 4, pad_id=pad_id, batch_size=options.batch_size)
    return edit_and_measure(model, tokenizer, targets, bases, kfac_plan, probe, reference, options,
                            apply=lambda: apply_step(targets, step, norm, options.edit)) | {
        "plan": {"step_from": "the tune half", "block": "the components the chosen K-FAC edit deletes",
                 "rule": kfac_plan.to_dict()["rules"][0]},
        "step": {"norm": norm, "deletion_norm": step.deletion_norm, "gradient_share_in_block": step.gradient_share,
                 "bisection": [{"amount": s.amount, "perplexity": s.value} for s in search.steps]},
        "note": (f"one coherent step up the tune half's suffix loss in the block K-FAC deletes, norm {norm:.4g} "
                 f"({norm / step.deletion_norm:.2f} x the deletion's), the largest within K-FAC's perplexity")}


def seed_frontier(seeded: ImplantedSeed, targets: list[Any], heldout: Sequence[Window],
                  ppl_text: Sequence[Sequence[int]], options: StudyOptions) -> Any:
    """The frontier of every method at a seed's chosen placement (`curvedit.diagnostics.frontier`,
    the study's `frontier_keep` amounts), written to `out/seed-N/frontier/`; an interrupted one
    resumes from its journal in the seed's records.

    Returns:
        The `FrontierResult`.
    """
    seed = seeded.seed
    out = options.out / f"seed-{seed}" / "frontier"
    frontier_options = FrontierOptions(keep_fractions=options.frontier_keep, settings=replace(options.edit, seed=seed),
                                       batch_size=options.batch_size, progress=options.progress)
    result = run_frontier(seeded.model, seeded.tokenizer, seeded.factor_dir, targets, heldout, ppl_text,
                          frontier_options, journal=seeded.records / FRONTIER_JOURNAL)
    result.write(out)
    return result


def match_recall(apply: Callable[[float], Any], recall: Callable[[], float], target: float, steps: int
                 ) -> dict[str, Any]:
    """The keep fraction whose recall (which falls as less is kept) comes closest to `target`,
    by bisection; the first amount that hits it exactly ends the search.

    Args:
        apply: amount -> the edit applied in memory (an `AppliedEdit`).
        recall: the recall of the model as it is now.
        target: the recall to reach.
        steps: candidates at most.

    Returns:
        `amount` (1.0 when no candidate removed anything), `reached` (its recall, None then),
        `target` and every step's amount and recall.
    """
    # bisect_edit moves towards smaller amounts while the value is at most the target; with the
    # value -recall that is while recall is still at least the target
    found = bisect_edit(apply, lambda: -recall(), -target, mode="match", gap=lambda value: abs(value + target),
                        steps=steps, description=f"keep for recall {target:.3f}")
    return {"target": target, "amount": found.amount, "reached": None if found.value is None else -found.value,
            "steps": [{"amount": s.amount, "recall": -s.value} for s in found.steps]}


def protection_variants(variant: Callable[..., None], kit: VariantKit, kfac_plan: EditPlan, kfac_tune_loose: float,
                        options: StudyOptions, probes_used: Sequence[str]) -> None:
    """K-FAC at the strict bound (`protect_strict`), and per band with a usable family its
    protected edits: at K-FAC's amount, at K-FAC's tune loose recall (`protect_match`) and at
    the strict bound. `variant(name, compute, settings)` measures one or reads it back; a
    band's protect factors are collected once, only when one of its variants is measured."""
    seeded = kit.seeded
    tokenizer, pad_id, seed = seeded.tokenizer, seeded.pad_id, seeded.seed
    if options.protect_strict is not None:
        variant("kfac_strict", lambda: strict_variant(seeded.model, tokenizer, kit.targets, kit.bases, "K-FAC",
                                                      kit.probe, kit.reference, options, pad_id),
                ["tune-strict", options.protect_strict])
    for band, families in (protect_bands(probes_used).items() if options.protect_items else ()):
        protection = functools.cache(lambda families=families: band_protection(
            seeded.model, tokenizer, kit.targets, kit.bases, families, options, pad_id, seed))
        variant(variant_name(band), lambda band=band, families=families, protection=protection: protected_variant(
            seeded.model, tokenizer, kit.targets, protection(), kfac_plan, band, families, kit.probe, kit.reference,
            options, pad_id), options.protect_items)
        if options.protect_match:
            variant(variant_name(band) + "_matched", lambda band=band, families=families, protection=protection:
                    protected_variant(seeded.model, tokenizer, kit.targets, protection(), kfac_plan, band, families,
                                      kit.probe, kit.reference, options, pad_id, match_tune_loose=kfac_tune_loose),
                    [options.protect_items, "tune-loose"])
        if options.protect_strict is not None:
            variant(variant_name(band) + "_strict", lambda band=band, families=families, protection=protection:
                    strict_variant(seeded.model, tokenizer, kit.targets, protection()[0],
                                   f"K-FAC with {band} protected", kit.probe, kit.reference, options, pad_id)
                    | {"protected": {"band": band, "families": families, "items": protection()[1]}},
                    [options.protect_items, "tune-strict", options.protect_strict])


def run_seed(base_dir: Path, seed: int, data: StudyData, options: StudyOptions, base: dict[str, Any],
             probes_used: Sequence[str], log: Callable[[str], None], beyond: bool = False) -> dict[str, Any]:
    """Every stage for one implant seed; returns its results. Each stage is recorded in
    `options.records` under the key of what it depends on and read back from there; the
    implanted model and the factors are made (`ImplantedSeed`) only when a stage has to run.
    With `beyond`, also the work beyond the paper (`beyond_paper`: EK-FAC masses, the targeted
    edit, durability attacks), under "beyond"."""
    seeded = ImplantedSeed(base_dir, seed, data, options, base)
    folder = seeded.records
    timer = Timer(lambda name: log(f"seed {seed}: {name}"))
    stage, timings = timer.stage, timer.seconds

    manifest = stage("implant", lambda: seeded.implant, folder / "implant.json")["manifest"]
    tokenizer, model_key = seeded.tokenizer, seeded.model_key

    def found() -> dict[str, Any]:
        windows, styles = find_canaries(seeded.model, tokenizer, manifest, options)
        tune, heldout = split_halves(windows, styles, seed)
        return {"tune": [asdict(w) for w in tune], "heldout": [asdict(w) for w in heldout]}

    halves = stage("find_memorized", lambda: cached(folder / "found.json", model_key, found), folder / "found.json")
    tune, heldout = [Window(**d) for d in halves["tune"]], [Window(**d) for d in halves["heldout"]]
    if not tune or not heldout:
        raise StudyError(f"seed {seed}: the {len(tune) + len(heldout)} recited canaries leave the tune or the "
                         "held-out half empty (the halves split each style, so a style needs two recited canaries): "
                         "raise the canaries, the implant steps or the learning rate")
    factor_key = seeded.factor_key
    stage("collect", lambda: seeded.factors, folder / "factors.key.json")
    ppl_text = data.ppl_subset(options.ppl_sequences)
    tasks = study_tasks(probes_used, options.probe_items)
    floor = held_floor(options.probe_floor, probes_used)
    held = list(floor or {})  # the sweep scores only what the floor holds
    grid = SweepGrid(layers=options.layer_grid, matrices=options.matrices)
    sweep_options = SweepOptions(ppl_budget=options.ppl_budget, batch_size=options.batch_size, bisect_budget=True,
                                 bisect_steps=options.bisect_steps, settings=options.edit,
                                 progress=options.progress, probe_floor=floor, probe_margin=options.probe_margin)
    sweep_key = content_key({"factors": factor_key, "grid": asdict(grid) | {"method": options.edit.method},
                             "sweep": sweep_key_fields(sweep_options, None if floor is None else
                                                       [options.probe_items, held]),
                             "tune": halves["tune"], "ppl": options.ppl_sequences})

    def sweep() -> dict[str, Any]:
        result = run_sweep(seeded.model, tokenizer, seeded.factor_dir, grid, tune, ppl_text, sweep_options,
                           tasks=study_tasks(held, options.probe_items) if floor is not None else (),
                           journal=folder / SWEEP_JOURNAL)  # an interrupted study resumes at the next cell
        result.write(options.out / f"seed-{seed}")
        return result.to_dict()

    swept = stage("sweep", lambda: cached(folder / "sweep.key.json", sweep_key, sweep), folder / "sweep.key.json")
    chosen_index, floor_met = swept.get("chosen"), floor is not None
    if chosen_index is None and floor is not None:  # say so, and measure the perplexity-only choice
        log(f"seed {seed}: no sweep point keeps the probe floor {floor}; going on with the perplexity-only choice")
        chosen_index, floor_met = budget_choice(swept, options.ppl_budget), False
    if chosen_index is None:
        raise StudyError(f"seed {seed}: no sweep point within {options.ppl_budget}x perplexity; see {options.out}/"
                         f"seed-{seed}/sweep.json")
    chosen = swept["points"][chosen_index]
    pad_id = seeded.pad_id
    implanted = [c["text"] for c in manifest["canaries"]]
    nonmembers = canary_token_ids(nonmember_canaries(options, seed, implanted), tokenizer,
                                  options.implant.prefix_len + options.implant.suffix_len)
    kit = VariantKit(seeded, chosen, tune, heldout, nonmembers, tasks, data)
    kfac_plan = EditPlan([EditRule(**{chosen["amount_kind"]: chosen["amount"]})], options.edit)
    variant_key = content_key({"sweep": sweep_key, "chosen": chosen_index, "halves": halves, "v": 4,
                               "probes": [options.probe_items, list(probes_used)]})

    @functools.cache
    def kfac_ppl() -> float:
        return cached(folder / "kfac_perplexity.json", variant_key, lambda: perplexity_after(
            seeded.model, kit.targets, kit.bases, kfac_plan, ppl_text, pad_id, options.batch_size))

    bsn_settings = [options.bsn_ratios, options.bsn_epochs, options.bsn_lr]
    variants: dict[str, Any] = {}

    def variant(name: str, compute: Callable[[], dict[str, Any]], settings: Any = None) -> None:
        """Measure (or read back) one variant; `settings` are what only this variant depends on."""
        record = folder / "variants" / f"{name}.json"
        key = variant_key if settings is None else content_key({"variants": variant_key, name: settings})
        variants[name] = stage(name, lambda: cached(record, key, compute), record)

    variant("unedited", lambda: measure(seeded.model, tokenizer, kit.probe, kit.reference, options))
    variant("kfac", lambda: edit_and_measure(seeded.model, tokenizer, kit.targets, kit.bases, kfac_plan, kit.probe,
                                              kit.reference, options))
    unedited_ppl = swept["baseline"]["perplexity"]  # the sweep measured the unedited model on the same text
    # the factor-data variants first: the choice of the study's factor text (pydoc, own samples, a mix) rests on them
    for kind in (k for k in options.factor_variants if k != options.factor_data):
        variant(f"kfac_{kind}_factors", lambda kind=kind: other_factors_variant(
            seeded.model, tokenizer, kit.targets, data, kind, seeded.cache, model_key, kit.probe, kit.reference,
            options, unedited_ppl, pad_id, seed), [kind, options.factor_tokens, options.factor_batch])
    kept_share = variants["kfac"]["kept_components"] / variants["kfac"]["total_components"]
    variant("random_count", lambda: edit_and_measure(
        seeded.model, tokenizer, kit.targets, kit.bases, EditPlan([EditRule(keep_fraction=kept_share)],
                                                                  replace(options.edit, method="random", seed=seed)),
        kit.probe, kit.reference, options) | {"note": "random components, as many as K-FAC keeps"})
    for name, method in (("random_ppl", "random"), ("svd", "svd")):
        variant(name, lambda method=method: matched_control(
            seeded.model, tokenizer, kit.targets, kit.bases, method, kfac_ppl(), unedited_ppl, kit.probe,
            kit.reference, options, pad_id, seed))

    variant("bsn", lambda: bsn_variant(seeded.model, tokenizer, kit.targets, data, kit.probe, kit.reference, options,
                                       unedited_ppl, pad_id, seed), bsn_settings)
    if options.paper_layers is not None:
        paper_layers = middle_three(seeded.n_layers) if options.paper_layers == "middle" else options.paper_layers
        variant("paper_placement", lambda: paper_placement(
            seeded.model, tokenizer, seeded.factor_dir, paper_layers, kit.probe, kit.reference, options, unedited_ppl,
            pad_id), paper_layers)
    if options.step_variant:
        variant("step", lambda: step_variant(seeded.model, tokenizer, kit.targets, kit.bases, kfac_plan, kfac_ppl(),
                                             unedited_ppl, kit.probe, kit.reference, options, pad_id),
                ["step", 4, options.bisect_steps + 4])
    protection_variants(variant, kit, kfac_plan, chosen["loose"], options, probes_used)
    extra = None
    if beyond and options.beyond_edits:
        def compute_beyond() -> dict[str, Any]:
            return beyond_paper(seeded.model, tokenizer, kit.targets, kit.bases, seeded.factor_dir, seeded.factor_text,
                                kit.probe, kit.reference, options, seed=seed, kfac_plan=kfac_plan, kfac_ppl=kfac_ppl(),
                                unedited_ppl=unedited_ppl, bsn_ratio=variants["bsn"]["bsn"]["ratio"],
                                retain=data.train)
        beyond_key = content_key({"variants": variant_key, "bsn": bsn_settings, "beyond": asdict(BEYOND), "v": 1})
        extra = stage("beyond", lambda: cached(folder / BEYOND_RECORD, beyond_key, compute_beyond),
                      folder / BEYOND_RECORD)
    layer_map_result = None
    if beyond and options.layer_map_keep is not None:

        def compute_map() -> dict[str, Any]:
            few = study_tasks(probes_used, LAYER_MAP_PROBE_ITEMS)
            return run_layer_map(seeded.model, tokenizer, seeded.factor_dir, tune, ppl_text,
                                 options.out / f"seed-{seed}", keep_fraction=options.layer_map_keep, tasks=few,
                                 batch_size=options.batch_size, progress=options.progress,
                                 journal=folder / LAYER_MAP_JOURNAL)
        map_key = content_key({"factors": factor_key, "tune": halves["tune"], "keep": options.layer_map_keep,
                               "ppl": options.ppl_sequences,
                               "probes": [LAYER_MAP_PROBE_ITEMS, list(probes_used)], "v": 1})
        layer_map_result = stage("layer_map", lambda: cached(folder / LAYER_MAP_RECORD, map_key, compute_map),
                                 folder / LAYER_MAP_RECORD)

    frontier_result = None
    if beyond and options.frontier_keep:
        def compute_frontier() -> dict[str, Any]:
            return seed_frontier(seeded, kit.targets, heldout, ppl_text, options).to_dict()
        frontier_key = content_key({"variants": variant_key, "keep": list(options.frontier_keep), "v": 1})
        frontier_result = stage("frontier", lambda: cached(folder / FRONTIER_RECORD, frontier_key, compute_frontier),
                                folder / FRONTIER_RECORD)

    windows = tune + heldout
    style_energy_result = stage("style_energy", lambda: cached(
        folder / "style_energy.json", content_key({"variants": variant_key, "v": 2}), lambda: style_energy(
            seeded.model, kit.targets, kit.bases, windows, [style_of(w) for w in windows], ppl_text, pad_id=pad_id,
            batch_size=options.batch_size, nonmembers=nonmembers)), folder / "style_energy.json")

    def analysis() -> None:
        layers = sorted({t.layer for t in kit.targets})
        shown = {layers[round(i * (len(layers) - 1) / 2)] for i in range(3)} if len(layers) > 3 else set(layers)
        run_band_analysis(seeded.model, [t for t in kit.targets if t.layer in shown], kit.bases, heldout, data.heldout,
                          options.out / f"seed-{seed}", pad_id)

    stage("analysis", lambda: cached(folder / "analysis.json", content_key({"variants": variant_key, "v": 1}),
                                     analysis), folder / "analysis.json")
    implant_keys = ("steps", "recall", "perplexity_before", "perplexity_after", "kl_after", "stopped", "history")
    return {"seed": seed, "implant": {k: manifest["result"].get(k) for k in implant_keys},
            "layer_map": layer_map_result, "frontier": frontier_result, "style_energy": style_energy_result,
            "canaries": manifest["canaries"], "found": {"tune": len(tune), "heldout": len(heldout)},
            "sweep": {"chosen": chosen, "floor": floor, "floor_met": floor_met if floor is not None else None,
                      "points": [{k: p[k] for k in ("label", "layers", "matrices", "amount", "kept", "total",
                                                    "strict", "loose", "perplexity", "excluded")}
                                 for p in swept["points"]],
                      "baseline": swept["baseline"]},
            "variants": variants, "timings_s": timings, **({"beyond": extra} if extra is not None else {})}
