"""`curvedit demo --vision`: the paper's ViT experiment in miniature, end to end.

A small ViT is trained (on CPU) on the generated glyph world (`curvedit.experiments.demo.glyphs`) with
10% of its training labels replaced by random wrong labels, until it fits most of them.
Before any edit, each block's attention and MLP are switched off in turn to show what the
network uses. K-FAC factors are collected on the training images with labels sampled from
the model (true Fisher), at the CLS position by default. Edits (layer group x amount) are
tried on the *tune* half of the noisy images and on a validation half of the held-out images;
the one of highest true-label recovery that keeps validation accuracy is chosen, and the other
halves measure it, beside controls on the same layers: SVD truncation and random components
with their keep fraction bisected to K-FAC's validation accuracy (within one point), SVD
chosen like K-FAC, and random components of K-FAC's count.

Metrics (fractions, each with a 95% Wilson interval `METRIC_ci`): `noisy_memorized`
(prediction == the noisy training label), `noisy_true_label` (prediction == the true label)
on the eval half of the noisy images; `heldout_accuracy` on held-out images;
`clean_train_accuracy` on training images whose label was kept; `validation_accuracy` on
held-out images set aside to choose the edit and to match the controls.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from curvedit.diagnostics.ablate import SUBLAYERS, ablated
from curvedit.editing.budget import Bisection, bisect_edit, edit_at
from curvedit.editing.edit import EditPlan, EditRule, apply_edit
from curvedit.editing.settings import EditSettings
from curvedit.editing.sweep import matrices_spec
from curvedit.evaluate.intervals import wilson
from curvedit.experiments.demo.glyphs import MATPLOTLIB_FONTS, GlyphWorldConfig
from curvedit.experiments.demo.pipeline import DemoError, write_results_and_report
from curvedit.experiments.demo.train import TRAIN_META, cached_model_dir
from curvedit.experiments.demo.vision_data import (
    LabelledImages,
    NoisySplit,
    VisionDataConfig,
    load_images,
    split_and_corrupt,
)
from curvedit.experiments.demo.vision_report import write_vision_report
from curvedit.experiments.demo.vision_train import VisionTrainConfig, predict, train_vision_model
from curvedit.experiments.stages import Timer
from curvedit.kfac.collect import CollectOptions, collect_factors
from curvedit.kfac.factors import save_factors
from curvedit.kfac.objectives import ImageClassificationObjective
from curvedit.kfac.spectrum import SelectionError, load_bases
from curvedit.kfac.targets import Target, select_targets

SHIPPED_CHECKPOINT = Path(__file__).parent / "vision_checkpoint"


@dataclass
class VisionDemoOptions:
    """Settings of the vision demo.

    Attributes:
        out: output folder (report, results.json, plot, factors, model cache).
        train: the data, the label noise and the ViT to train.
        retrain: train even when a shipped or cached model matches `train`.
        positions: token positions whose inputs/gradients enter the factors: "cls" (the
            paper's choice) or "all".
        label_draws: labels sampled per training image for the factors (passes over the
            training images). A model that fits its training set is confident, so a single
            draw per image gives a noisy G; more draws average it.
        layer_grid: layer groups tried; None for each layer alone, first+last, and all.
        matrices: target preset or module-name pattern edited ("mlp": fc1 and fc2).
        rho_grid: curvature-mass fractions kept that are tried (and plotted).
        keep_grid: component-count fractions kept that are tried.
        svd_keep_grid: singular-value count fractions tried for the SVD control.
        guard: the metric a chosen edit must keep: "validation_accuracy" (held-out images set
            aside for choosing) or "clean_train_accuracy" (training images with kept labels;
            a model that fits its training set loses it with any edit that removes memorization).
        guard_budget: a candidate may lower the guard by at most this (absolute) below the
            unedited model's.
        validation_fraction: share of the held-out images set aside for choosing the edit and
            matching the controls; the rest are reported as held-out accuracy.
        clean_images: how many clean training images (the first, in index order) guard the
            choice and are measured.
        match_tolerance: the matched controls' validation accuracy must land this close
            (absolute) to K-FAC's.
        match_steps: bisection steps at most for each matched control.
        frontier_grid: keep fractions of K-FAC, SVD and random components measured on the
            chosen layers and on first+last, to compare the methods at every accuracy.
        seed: seed of the label sampler and of the random control.
        progress: show progress bars.
    """

    out: Path = Path("demo-out/vision")
    train: VisionTrainConfig = field(default_factory=VisionTrainConfig)
    retrain: bool = False
    positions: str = "cls"
    label_draws: int = 4
    layer_grid: tuple[str, ...] | None = None
    matrices: str = "mlp"
    rho_grid: tuple[float, ...] = (0.6, 0.75, 0.9, 0.99, 0.995, 0.999, 0.9995, 0.9999)
    keep_grid: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2)
    svd_keep_grid: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
    guard: str = "validation_accuracy"
    guard_budget: float = 0.01
    validation_fraction: float = 0.5
    clean_images: int = 2000
    match_tolerance: float = 0.01
    match_steps: int = 12
    frontier_grid: tuple[float, ...] = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8)
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        """Raise DemoError for amounts outside (0, 1], a share outside (0, 1), or counts below 1."""
        for name, values in {"rho_grid": self.rho_grid, "keep_grid": self.keep_grid,
                             "svd_keep_grid": self.svd_keep_grid, "frontier_grid": self.frontier_grid}.items():
            if any(not 0 < v <= 1 for v in values):
                raise DemoError(f"{name} values must be in (0, 1], got {list(values)}")
        if not 0 < self.validation_fraction < 1:
            raise DemoError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}")
        for name, value in {"label_draws": self.label_draws, "clean_images": self.clean_images,
                            "match_steps": self.match_steps}.items():
            if value < 1:
                raise DemoError(f"{name} must be at least 1, got {value}")
        if self.positions not in ("cls", "all"):
            raise DemoError(f"positions must be 'cls' or 'all', got {self.positions!r}")
        if self.guard not in ("validation_accuracy", "clean_train_accuracy"):
            raise DemoError(f"guard must be 'validation_accuracy' or 'clean_train_accuracy', got {self.guard!r}")
        if self.guard_budget < 0 or self.match_tolerance < 0:
            raise DemoError("guard_budget and match_tolerance are non-negative accuracy differences")


def smoke_vision_options(out: Path) -> VisionDemoOptions:
    """A configuration small enough for a test (seconds): every stage runs, little is learned."""
    data = VisionDataConfig(image_size=8, world=GlyphWorldConfig(images=240, fonts=MATPLOTLIB_FONTS[:2]))
    train = VisionTrainConfig(data=data, patch_size=4, hidden=16, layers=2, heads=2, intermediate=32, epochs=2,
                              batch_size=32, warmup_steps=2)
    return VisionDemoOptions(out=out, train=train, label_draws=1, rho_grid=(0.9, 0.99), keep_grid=(0.5,),
                             svd_keep_grid=(0.5,), guard_budget=1.0, match_steps=3,
                             frontier_grid=(0.5,), progress=False)


def default_layer_grid(layers: int) -> tuple[str, ...]:
    """Each layer alone, then first+last and all layers (the paper edits first+last).

    Args:
        layers: the model's number of blocks.

    Returns:
        Layer groups in the `parse_layers` syntax, e.g. ("0", "1", "2", "3", "0,3", "0-3").
    """
    singles = tuple(str(i) for i in range(layers))
    if layers == 1:
        return singles
    if layers == 2:
        return singles + ("0-1",)
    return singles + (f"0,{layers - 1}", f"0-{layers - 1}")


def vision_model_dir(options: VisionDemoOptions, images: LabelledImages, split: NoisySplit) -> Path:
    """The model to edit: the shipped checkpoint when it was trained with this config on this
    data, else `out/model-cache/<hash>` when it was, else a new training written there.

    Args:
        options: the demo settings (`train`, `retrain`, `out`, `progress`).
        images: the loaded images (their fingerprint is part of the hash).
        split: the split and noisy labels to train on.

    Returns:
        The HF model directory.
    """
    wanted = options.train.config_hash(images.fingerprint)
    found = None if options.retrain else cached_model_dir(wanted, (SHIPPED_CHECKPOINT,
                                                                   options.out / "model-cache" / wanted))
    return found or train_vision_model(options.train, images, split, options.out / "model-cache" / wanted,
                                       progress=options.progress)


# metric, the probe part it is measured on, and which label counts as a hit
METRIC_PARTS = (("tune_memorized", "noisy_tune", "noisy"), ("tune_true_label", "noisy_tune", "true"),
                ("noisy_memorized", "noisy_eval", "noisy"), ("noisy_true_label", "noisy_eval", "true"),
                ("clean_train_accuracy", "clean", "true"), ("validation_accuracy", "validation", "true"),
                ("heldout_accuracy", "heldout", "true"))


@dataclass
class Probe:
    """The images a measurement needs, with their labels.

    Attributes:
        pixels: the union of the images measured.
        index: for each part (`noisy_tune`, `noisy_eval`, `clean`, `heldout`), positions in `pixels`.
        true: true labels of `pixels`.
        noisy: training labels of `pixels` (noisy on noisy images).
    """

    pixels: torch.Tensor
    index: dict[str, torch.Tensor]
    true: torch.Tensor
    noisy: torch.Tensor


def build_probe(images: LabelledImages, split: NoisySplit, parts: tuple[str, ...]) -> Probe:
    """Gather the images of several parts of a split into one probe (one forward pass).

    Args:
        images: the preprocessed images.
        split: the split and its noisy labels.
        parts: names of `NoisySplit` index fields ("noisy_tune", "noisy_eval", "clean", "heldout").

    Returns:
        The probe.
    """
    chosen = [getattr(split, part) for part in parts]
    sizes = [len(c) for c in chosen]
    offsets = torch.tensor([0, *sizes]).cumsum(0).tolist()
    every = torch.cat(chosen)
    index = {part: torch.arange(offsets[i], offsets[i + 1]) for i, part in enumerate(parts)}
    return Probe(pixels=images.pixels[every], index=index, true=images.labels[every],
                 noisy=split.train_labels[every])


def measure(model: torch.nn.Module, probe: Probe, intervals: bool = False) -> dict[str, Any]:
    """Metrics (fractions) on the probe's parts.

    Args:
        model: the (possibly edited) classifier.
        probe: the images and labels.
        intervals: also give each metric's 95% Wilson interval as `METRIC_ci`.

    Returns:
        `tune_memorized`/`tune_true_label` (noisy_tune), `noisy_memorized`/`noisy_true_label`
        (noisy_eval), `clean_train_accuracy` (clean), `heldout_accuracy` (heldout): each
        present when its part is in the probe.
    """
    predicted = predict(model, probe.pixels)
    out: dict[str, Any] = {}
    for key, part, which in METRIC_PARTS:
        if part in probe.index:
            rows = probe.index[part]
            labels = probe.noisy if which == "noisy" else probe.true
            hits = int((predicted[rows] == labels[rows]).sum())
            out[key] = hits / len(rows)
            if intervals:
                out[f"{key}_ci"] = wilson(hits, len(rows)).to_dict()
    return out


def collect_vision_factors(model: torch.nn.Module, images: LabelledImages, split: NoisySplit, targets: list[Target],
                           options: VisionDemoOptions) -> Path:
    """Collect factors on every training image (noisy ones included) with labels sampled from
    the model, `options.label_draws` draws per image, at `options.positions`.

    Args:
        model: the unedited model.
        images: the preprocessed images.
        split: which images are training images.
        targets: the weights to collect factors for.
        options: the demo settings.

    Returns:
        The factor directory, `out/factors`.
    """
    pixels, labels = images.pixels[split.train], split.train_labels[split.train]
    batches = [{"pixel_values": pixels[i:i + 128], "labels": labels[i:i + 128]} for i in range(0, len(pixels), 128)]
    factors = collect_factors(
        model, batches * options.label_draws, targets, ImageClassificationObjective("sampled", options.positions),
        CollectOptions(seed=options.seed, progress=options.progress, total_tokens=len(pixels) * options.label_draws,
                       description=f"vision demo training images ({len(pixels)}, {len(split.noisy)} with noisy "
                                   f"labels), {options.label_draws} sampled labels each",
                       extra={"positions": options.positions, "label_draws": options.label_draws}))
    return save_factors(factors, options.out / "factors")


@dataclass
class Candidate:
    """One edit tried on the tune split.

    Attributes:
        method: "kfac" or "svd".
        layers: layer group.
        amount_kind: "rho" or "keep_fraction".
        amount: its value.
        kept: components kept over all edited matrices.
        total: components in all.
        mass_kept: mean share of curvature mass (svd: squared singular-value energy) kept.
        metrics: `tune_memorized`, `tune_true_label`, `clean_train_accuracy`,
            `validation_accuracy`.
    """

    method: str
    layers: str
    amount_kind: str
    amount: float
    kept: int
    total: int
    mass_kept: float
    metrics: dict[str, float]


def choose_candidate(candidates: list[Candidate], baseline: float, budget: float,
                     guard: str = "validation_accuracy") -> int | None:
    """The candidate of highest tune true-label recovery among those whose `guard` metric is
    at least `baseline - budget`; ties go to lower tune memorization, then to the higher
    guard, then to grid order.

    Args:
        candidates: the candidates, in grid order.
        baseline: the unedited model's `guard` metric.
        budget: the largest drop of the guard allowed (absolute).
        guard: the metric that must hold ("validation_accuracy" or "clean_train_accuracy").

    Returns:
        Its index, or None when no candidate is within the budget.
    """
    allowed = [i for i, c in enumerate(candidates) if c.metrics[guard] >= baseline - budget]
    if not allowed:
        return None
    return min(allowed, key=lambda i: (-candidates[i].metrics["tune_true_label"],
                                       candidates[i].metrics["tune_memorized"], -candidates[i].metrics[guard], i))


def _edit_and_measure(model, targets: list[Target], plan: EditPlan, bases, probe: Probe, intervals: bool = False
                      ) -> tuple[dict[str, Any], list]:
    applied = apply_edit(targets, plan, bases)
    try:
        return measure(model, probe, intervals), applied.stats
    finally:
        applied.undo()


def sweep_candidates(model: torch.nn.Module, targets_of: Callable[[str], list[Target]], bases, probe: Probe,
                     settings: list[tuple[str, str, str, float]], seed: int, progress: bool,
                     description: str = "sweep") -> list[Candidate]:
    """Apply each edit, measure it, and undo it (bit for bit).

    Args:
        model: the unedited model.
        targets_of: layer group -> the targets to edit.
        bases: target name -> eigenbasis (not needed by svd).
        probe: what to measure.
        settings: (method, layer group, "rho" or "keep_fraction", amount) per edit.
        seed: seed of the random control.
        progress: show a progress bar.
        description: the progress bar's label.

    Returns:
        One `Candidate` per setting, in order, except settings that would keep nothing of some
        weight (an SVD keep fraction below one singular value), which are left out.
    """
    out = []
    for method, layers, kind, amount in tqdm(settings, desc=description, unit="edit", disable=not progress):
        plan = EditPlan([EditRule(**{kind: amount})], EditSettings(method=method, seed=seed))
        try:
            metrics, stats = _edit_and_measure(model, targets_of(layers), plan, bases, probe)
        except SelectionError:
            continue
        out.append(Candidate(method=method, layers=layers, amount_kind=kind, amount=amount,
                             kept=sum(s.kept for s in stats), total=sum(s.total for s in stats),
                             mass_kept=sum(s.mass_kept for s in stats) / len(stats), metrics=metrics))
    return out


def ablate_sublayers(model: torch.nn.Module, probe: Probe, blocks: int, progress: bool = False
                     ) -> list[dict[str, Any]]:
    """Switch off each block's attention, then its MLP, one at a time, and measure.

    Args:
        model: the unedited classifier.
        probe: what to measure.
        blocks: the model's number of blocks.
        progress: show a progress bar.

    Returns:
        One row per (block, sublayer): `{"block", "sublayer", **measure(model, probe)}`.
    """
    rows = []
    for block, kind in tqdm([(b, k) for b in range(blocks) for k in SUBLAYERS], desc="ablate", unit="sublayer",
                            disable=not progress):
        with ablated(model, kind, block):
            rows.append({"block": block, "sublayer": kind, **measure(model, probe)})
    return rows


def match_accuracy(model: torch.nn.Module, targets: list[Target], bases, method: str, target: float,
                   validation: Probe, seed: int, steps: int, tolerance: float) -> Bisection:
    """Bisect the keep fraction of an `svd` or `random` edit of `targets` until its accuracy
    on the validation images lands within `tolerance` (absolute) of `target`.

    Args:
        model: the unedited classifier.
        targets: the weights edited (those K-FAC edited).
        bases: name -> eigenbasis (the random control draws components of it).
        method: "svd" or "random".
        target: the validation accuracy to match (K-FAC's).
        validation: a probe with the validation images.
        seed: seed of the random control.
        steps: bisection steps at most.
        tolerance: how close counts as matched (0.01: one point).

    Returns:
        The search (`value` is the validation *error* of the chosen amount).
    """
    def plan(amount: float) -> EditPlan:
        return EditPlan([EditRule(keep_fraction=amount)], EditSettings(method=method, seed=seed))

    def error() -> float:
        return 1 - measure(model, validation)["validation_accuracy"]

    return bisect_edit(edit_at(targets, plan, bases), error, 1 - target, mode="match",
                       gap=lambda e: abs(e - (1 - target)), steps=steps, tolerance=tolerance,
                       description=f"{method} keep fraction for accuracy {target:.3f}")


def run_vision_demo(options: VisionDemoOptions) -> dict[str, Any]:
    """Run the whole vision demo and write `results.json`, `report.md`, `rho_curve.png`,
    `ablation.png` and `frontier.png` to `options.out`.

    Args:
        options: the settings (`smoke_vision_options` for a seconds-long plumbing check).

    Returns:
        The results: `{"variants": {"unedited"|"kfac"|"svd_matched"|"random_matched"|"svd"|
        "random": metrics + intervals + settings + timings_s}, "settings": ..., "data": ...,
        "ablation": ..., "frontier": ..., "sweep": ..., "curve": ..., "timings_s": ...}`.

    Raises:
        curvedit.data.DataError: unusable images or splits.
        ValueError: an unknown `positions` or `guard`, or a model shape that does not fit the
            images.
        DemoError: no candidate edit keeps the guard metric within the budget.
    """
    from transformers import ViTForImageClassification  # noqa: PLC0415

    options.validate()
    options.out.mkdir(parents=True, exist_ok=True)
    timer = Timer()
    images = timer.stage("load_images", lambda: load_images(options.train.data))
    split = split_and_corrupt(images, options.train.data)
    model_dir = timer.stage("train_or_load", lambda: vision_model_dir(options, images, split))
    model = ViTForImageClassification.from_pretrained(model_dir).eval()
    all_targets = select_targets(model, matrices_spec(options.matrices, None))
    factor_dir = timer.stage("collect", lambda: collect_vision_factors(model, images, split, all_targets, options))
    bases = load_bases(all_targets, factor_dir)

    layer_grid = options.layer_grid or default_layer_grid(options.train.layers)
    target_cache: dict[str, list[Target]] = {}

    def targets_of(layers: str) -> list[Target]:
        if layers not in target_cache:
            target_cache[layers] = select_targets(model, matrices_spec(options.matrices, layers))
        return target_cache[layers]

    measured = replace(split.split_validation(options.validation_fraction, options.seed),
                       clean=split.clean[:options.clean_images])
    tune_probe = build_probe(images, measured, ("noisy_tune", "clean", "validation"))
    eval_probe = build_probe(images, measured, ("noisy_tune", "noisy_eval", "clean", "validation", "heldout"))
    validation_probe = build_probe(images, measured, ("validation",))
    unedited = timer.stage("measure_unedited", lambda: measure(model, eval_probe, intervals=True))
    unedited_seconds = timer.seconds["measure_unedited"]
    ablation = timer.stage("ablate", lambda: ablate_sublayers(model, eval_probe, options.train.layers,
                                                              options.progress))

    kfac_settings = [("kfac", layers, kind, value) for layers in layer_grid
                     for kind, values in (("rho", options.rho_grid), ("keep_fraction", options.keep_grid))
                     for value in values]
    svd_settings = [("svd", layers, "keep_fraction", value) for layers in layer_grid for value in options.svd_keep_grid]
    candidates = timer.stage("sweep", lambda: sweep_candidates(model, targets_of, bases, tune_probe,
                                                               kfac_settings + svd_settings, options.seed,
                                                               options.progress))
    chosen: dict[str, Candidate] = {}
    guard = options.guard
    for method in ("kfac", "svd"):
        pool = [c for c in candidates if c.method == method]
        index = choose_candidate(pool, unedited[guard], options.guard_budget, guard)
        if index is None:
            raise DemoError(f"no {method} edit keeps the {guard} within {options.guard_budget} of the unedited "
                            f"{unedited[guard]:.3f}; widen the grid or the budget")
        chosen[method] = pool[index]

    variants: dict[str, dict[str, Any]] = {"unedited": {**unedited, "settings": {}, "timings_s": unedited_seconds}}

    def run_variant(name: str, layers: str, rule: EditRule, method: str, note: str, **extra: Any) -> None:
        start = time.perf_counter()
        plan = EditPlan([rule], EditSettings(method=method, seed=options.seed))
        metrics, stats = _edit_and_measure(model, targets_of(layers), plan, bases, eval_probe, intervals=True)
        variants[name] = {**metrics, "settings": {
            "layers": layers, "matrices": options.matrices, "plan": plan.to_dict(),
            "kept_components": sum(s.kept for s in stats), "total_components": sum(s.total for s in stats),
            "mass_kept": sum(s.mass_kept for s in stats) / len(stats), "note": note, **extra},
            "timings_s": round(time.perf_counter() - start, 1)}

    def rule_of(pick: Candidate) -> EditRule:
        return EditRule(**{pick.amount_kind: pick.amount})

    def fixed_variants() -> None:
        kfac = chosen["kfac"]
        run_variant("kfac", kfac.layers, rule_of(kfac), "kfac", "chosen on the tune split")
        run_variant("svd", chosen["svd"].layers, rule_of(chosen["svd"]), "svd",
                    "SVD truncation, keep fraction chosen on the tune split the same way")
        run_variant("random", kfac.layers, rule_of(kfac), "random", "as many components as kfac, chosen at random")

    timer.stage("variants", fixed_variants)

    def matched_variants() -> None:
        kfac = chosen["kfac"]
        target = variants["kfac"]["validation_accuracy"]
        for method in ("svd", "random"):
            search = match_accuracy(model, targets_of(kfac.layers), bases, method, target, validation_probe,
                                    options.seed, options.match_steps, options.match_tolerance)
            matched = search.edited and abs((1 - search.value) - target) <= options.match_tolerance
            run_variant(f"{method}_matched", kfac.layers, EditRule(keep_fraction=search.amount), method,
                        f"{method} on kfac's layers, keep fraction bisected to kfac's validation accuracy "
                        f"({'within' if matched else 'NOT within'} {100 * options.match_tolerance:g} point)",
                        matched=matched, target_validation_accuracy=target,
                        search=[asdict(step) for step in search.steps])

    timer.stage("matched_controls", matched_variants)

    last = options.train.layers - 1
    frontier_groups = list(dict.fromkeys([chosen["kfac"].layers, f"0,{last}" if last else "0"]))

    def curve() -> list[dict[str, Any]]:
        points = []
        for layers in frontier_groups:
            for rho in options.rho_grid:
                plan = EditPlan([EditRule(rho=rho)])
                metrics, stats = _edit_and_measure(model, targets_of(layers), plan, bases, eval_probe, intervals=True)
                points.append({"layers": layers, "rho": rho,
                               "kept_fraction": sum(s.kept for s in stats) / sum(s.total for s in stats), **metrics})
        return points

    rho_curve = timer.stage("rho_curve", curve)
    frontier_settings = [(method, layers, "keep_fraction", amount) for layers in frontier_groups
                         for method in ("kfac", "svd", "random") for amount in options.frontier_grid]
    frontier = timer.stage("frontier", lambda: sweep_candidates(model, targets_of, bases, eval_probe,
                                                                frontier_settings, options.seed, options.progress,
                                                                "frontier"))
    train_meta = json.loads((Path(model_dir) / TRAIN_META).read_text())
    results = {
        "variants": variants,
        "data": {"source": options.train.data.source, "classes": images.classes, "counts": measured.counts(),
                 "fingerprint": images.fingerprint},
        "settings": {
            "model_dir": str(model_dir), "train": asdict(options.train),
            "training": {k: train_meta.get(k) for k in ("seconds", "steps", "final_loss", "torch_threads")},
            "positions": options.positions, "label_draws": options.label_draws, "matrices": options.matrices,
            "layer_grid": list(layer_grid), "rho_grid": list(options.rho_grid), "keep_grid": list(options.keep_grid),
            "svd_keep_grid": list(options.svd_keep_grid), "guard": guard, "guard_budget": options.guard_budget,
            "validation_fraction": options.validation_fraction,
            "clean_images": len(measured.clean), "seed": options.seed,
            "match_tolerance": options.match_tolerance, "match_steps": options.match_steps,
            "frontier_grid": list(options.frontier_grid),
            "chosen": {method: asdict(c) for method, c in chosen.items()},
        },
        "ablation": ablation,
        "frontier": [asdict(c) for c in frontier],
        "sweep": [asdict(c) for c in candidates],
        "curve": rho_curve,
        "timings_s": timer.seconds,
    }
    return write_results_and_report(results, options.out, timer, write_vision_report)
