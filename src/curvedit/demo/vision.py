"""`curvedit demo --vision`: the paper's ViT experiment in miniature, end to end.

A small ViT is trained (on CPU) on images whose training labels are partly replaced by
random wrong labels, until it fits them. K-FAC factors are collected on the training images
with labels sampled from the model (true Fisher), at the CLS position by default. Edits
(layer group x amount) are tried on the *tune* half of the noisy images, one is chosen, and
the rest of the noisy images and the held-out images measure it, beside SVD truncation
(tuned the same way) and a random control (same number of components as K-FAC).

Metrics (fractions): `noisy_memorized` (prediction == the noisy training label),
`noisy_true_label` (prediction == the true label) on the eval half of the noisy images;
`heldout_accuracy` on held-out images; `clean_train_accuracy` on training images whose
label was kept (the guard used when choosing).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from curvedit.collect import CollectOptions, collect_factors
from curvedit.demo.pipeline import DemoError, Timer, write_results_and_report
from curvedit.demo.vision_data import LabelledImages, NoisySplit, VisionDataConfig, load_images, split_and_corrupt
from curvedit.demo.train import TRAIN_META, cached_model_dir
from curvedit.demo.vision_train import VisionTrainConfig, predict, train_vision_model
from curvedit.edit import EditPlan, EditRule, apply_edit
from curvedit.factors import save_factors
from curvedit.objectives import ImageClassificationObjective
from curvedit.spectrum import load_bases
from curvedit.sweep import matrices_spec
from curvedit.targets import Target, select_targets

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
        clean_budget: a candidate may lower the clean-training accuracy by at most this
            (absolute) below the unedited model's.
        seed: seed of the label sampler and of the random control.
        progress: show progress bars.
    """

    out: Path = Path("demo-out/vision")
    train: VisionTrainConfig = field(default_factory=VisionTrainConfig)
    retrain: bool = False
    positions: str = "cls"
    label_draws: int = 32
    layer_grid: tuple[str, ...] | None = None
    matrices: str = "mlp"
    rho_grid: tuple[float, ...] = (0.6, 0.75, 0.9, 0.99, 0.995, 0.999, 0.9995, 0.9999)
    keep_grid: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2)
    svd_keep_grid: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
    clean_budget: float = 0.02
    seed: int = 0
    progress: bool = True


def smoke_vision_options(out: Path) -> VisionDemoOptions:
    """A configuration small enough for a test (seconds): every stage runs, little is learned."""
    data = VisionDataConfig(max_images=120, image_size=8)
    train = VisionTrainConfig(data=data, patch_size=4, hidden=16, layers=2, heads=2, intermediate=32, epochs=2,
                              batch_size=32, warmup_steps=2)
    return VisionDemoOptions(out=out, train=train, label_draws=1, rho_grid=(0.9, 0.99), keep_grid=(0.5,),
                             svd_keep_grid=(0.5,), clean_budget=1.0, progress=False)


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


def measure(model: torch.nn.Module, probe: Probe) -> dict[str, float]:
    """Metrics (fractions) on the probe's parts.

    Args:
        model: the (possibly edited) classifier.
        probe: the images and labels.

    Returns:
        `tune_memorized`/`tune_true_label` (noisy_tune), `noisy_memorized`/`noisy_true_label`
        (noisy_eval), `clean_train_accuracy` (clean), `heldout_accuracy` (heldout): each
        present when its part is in the probe.
    """
    predicted = predict(model, probe.pixels)
    out: dict[str, float] = {}

    def share(part: str, labels: torch.Tensor) -> float:
        rows = probe.index[part]
        return int((predicted[rows] == labels[rows]).sum()) / len(rows)

    if "noisy_tune" in probe.index:
        out["tune_memorized"] = share("noisy_tune", probe.noisy)
        out["tune_true_label"] = share("noisy_tune", probe.true)
    if "noisy_eval" in probe.index:
        out["noisy_memorized"] = share("noisy_eval", probe.noisy)
        out["noisy_true_label"] = share("noisy_eval", probe.true)
    if "clean" in probe.index:
        out["clean_train_accuracy"] = share("clean", probe.true)
    if "heldout" in probe.index:
        out["heldout_accuracy"] = share("heldout", probe.true)
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
        metrics: `tune_memorized`, `tune_true_label`, `clean_train_accuracy`.
    """

    method: str
    layers: str
    amount_kind: str
    amount: float
    kept: int
    total: int
    mass_kept: float
    metrics: dict[str, float]


def choose_candidate(candidates: list[Candidate], baseline_clean: float, budget: float) -> int | None:
    """The candidate of highest tune true-label recovery among those whose clean-training
    accuracy is at least `baseline_clean - budget`; ties go to lower tune memorization, then
    to higher clean accuracy, then to grid order.

    Args:
        candidates: the candidates, in grid order.
        baseline_clean: the unedited model's clean-training accuracy.
        budget: the largest drop of clean-training accuracy allowed (absolute).

    Returns:
        Its index, or None when no candidate is within the budget.
    """
    allowed = [i for i, c in enumerate(candidates) if c.metrics["clean_train_accuracy"] >= baseline_clean - budget]
    if not allowed:
        return None
    return min(allowed, key=lambda i: (-candidates[i].metrics["tune_true_label"],
                                       candidates[i].metrics["tune_memorized"],
                                       -candidates[i].metrics["clean_train_accuracy"], i))


def _edit_and_measure(model, targets: list[Target], plan: EditPlan, bases, probe: Probe
                      ) -> tuple[dict[str, float], list]:
    applied = apply_edit(targets, plan, bases)
    try:
        return measure(model, probe), applied.stats
    finally:
        applied.undo()


def sweep_candidates(model: torch.nn.Module, targets_of: Callable[[str], list[Target]], bases, probe: Probe,
                     settings: list[tuple[str, str, str, float]], seed: int, progress: bool) -> list[Candidate]:
    """Apply each edit, measure it, and undo it (bit for bit).

    Args:
        model: the unedited model.
        targets_of: layer group -> the targets to edit.
        bases: target name -> eigenbasis (not needed by svd).
        probe: what to measure (the tune noisy images and the clean training images).
        settings: (method, layer group, "rho" or "keep_fraction", amount) per edit.
        seed: seed of the random control.
        progress: show a progress bar.

    Returns:
        One `Candidate` per setting, in order.
    """
    out = []
    for method, layers, kind, amount in tqdm(settings, desc="sweep", unit="edit", disable=not progress):
        plan = EditPlan([EditRule(**{kind: amount})], method=method, seed=seed)
        metrics, stats = _edit_and_measure(model, targets_of(layers), plan, bases, probe)
        out.append(Candidate(method=method, layers=layers, amount_kind=kind, amount=amount,
                             kept=sum(s.kept for s in stats), total=sum(s.total for s in stats),
                             mass_kept=sum(s.mass_kept for s in stats) / len(stats), metrics=metrics))
    return out


def run_vision_demo(options: VisionDemoOptions) -> dict[str, Any]:
    """Run the whole vision demo and write `results.json`, `report.md` and `rho_curve.png`
    to `options.out`.

    Args:
        options: the settings (`smoke_vision_options` for a seconds-long plumbing check).

    Returns:
        The results: `{"variants": {"unedited"|"kfac"|"svd"|"random": metrics + settings +
        timings_s}, "settings": ..., "data": ..., "sweep": ..., "curve": ..., "timings_s": ...}`.

    Raises:
        curvedit.data.DataError: unusable images or splits.
        ValueError: an unknown `positions` or a model shape that does not fit the images.
        DemoError: no candidate edit keeps the clean-training accuracy within the budget.
    """
    from transformers import ViTForImageClassification  # noqa: PLC0415

    from curvedit.demo.vision_report import write_vision_report  # noqa: PLC0415

    if options.positions not in ("cls", "all"):
        raise ValueError(f"positions must be 'cls' or 'all', got {options.positions!r}")
    if options.label_draws < 1:
        raise ValueError(f"label_draws must be at least 1, got {options.label_draws}")
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

    tune_probe = build_probe(images, split, ("noisy_tune", "clean"))
    eval_probe = build_probe(images, split, ("noisy_tune", "noisy_eval", "clean", "heldout"))
    unedited = timer.stage("measure_unedited", lambda: measure(model, eval_probe))
    unedited_seconds = timer.seconds["measure_unedited"]

    kfac_settings = [("kfac", layers, kind, value) for layers in layer_grid
                     for kind, values in (("rho", options.rho_grid), ("keep_fraction", options.keep_grid))
                     for value in values]
    svd_settings = [("svd", layers, "keep_fraction", value) for layers in layer_grid for value in options.svd_keep_grid]
    candidates = timer.stage("sweep", lambda: sweep_candidates(model, targets_of, bases, tune_probe,
                                                               kfac_settings + svd_settings, options.seed,
                                                               options.progress))
    chosen: dict[str, Candidate] = {}
    for method in ("kfac", "svd"):
        pool = [c for c in candidates if c.method == method]
        index = choose_candidate(pool, unedited["clean_train_accuracy"], options.clean_budget)
        if index is None:
            raise DemoError(f"no {method} edit keeps the clean-training accuracy within {options.clean_budget} of "
                            f"the unedited {unedited['clean_train_accuracy']:.3f}; widen the grid or the budget")
        chosen[method] = pool[index]

    variants: dict[str, dict[str, Any]] = {"unedited": {**unedited, "settings": {}, "timings_s": unedited_seconds}}

    def run_variant(name: str, pick: Candidate, method: str, note: str) -> None:
        start = time.perf_counter()
        plan = EditPlan([EditRule(**{pick.amount_kind: pick.amount})], method=method, seed=options.seed)
        metrics, stats = _edit_and_measure(model, targets_of(pick.layers), plan, bases, eval_probe)
        variants[name] = {**metrics, "settings": {
            "layers": pick.layers, "matrices": options.matrices, "plan": plan.to_dict(),
            "kept_components": sum(s.kept for s in stats), "total_components": sum(s.total for s in stats),
            "mass_kept": sum(s.mass_kept for s in stats) / len(stats), "note": note},
            "timings_s": round(time.perf_counter() - start, 1)}

    timer.stage("variants", lambda: (
        run_variant("kfac", chosen["kfac"], "kfac", "chosen on the tune split"),
        run_variant("svd", chosen["svd"], "svd", "SVD truncation, keep fraction chosen on the tune split the same way"),
        run_variant("random", chosen["kfac"], "random", "as many components as kfac, chosen at random")))

    def curve() -> list[dict[str, Any]]:
        points = []
        for rho in options.rho_grid:
            plan = EditPlan([EditRule(rho=rho)])
            metrics, stats = _edit_and_measure(model, targets_of(chosen["kfac"].layers), plan, bases, eval_probe)
            points.append({"rho": rho, "kept_fraction": sum(s.kept for s in stats) / sum(s.total for s in stats),
                           **metrics})
        return points

    rho_curve = timer.stage("rho_curve", curve)
    train_meta = json.loads((Path(model_dir) / TRAIN_META).read_text())
    results = {
        "variants": variants,
        "data": {"source": options.train.data.source, "classes": images.classes, "counts": split.counts(),
                 "fingerprint": images.fingerprint},
        "settings": {
            "model_dir": str(model_dir), "train": asdict(options.train),
            "training": {k: train_meta.get(k) for k in ("seconds", "steps", "final_loss", "torch_threads")},
            "positions": options.positions, "label_draws": options.label_draws, "matrices": options.matrices,
            "layer_grid": list(layer_grid), "rho_grid": list(options.rho_grid), "keep_grid": list(options.keep_grid),
            "svd_keep_grid": list(options.svd_keep_grid), "clean_budget": options.clean_budget, "seed": options.seed,
            "chosen": {method: asdict(c) for method, c in chosen.items()},
        },
        "sweep": [asdict(c) for c in candidates],
        "curve": rho_curve,
        "timings_s": timer.seconds,
    }
    return write_results_and_report(results, options.out, timer, write_vision_report)
