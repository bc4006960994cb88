"""`curvedit demo`: the whole method on the synthetic world, end to end.

train (or load) -> find the memorized windows -> collect factors on general text ->
choose layers and amount on the tune half under a perplexity budget -> edit ->
measure every family -> the same for the controls -> report.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from curvedit.data import Record, default_pad_id, lm_batches
from curvedit.diagnostics.analysis import BandOptions, band_analysis, task_family_shares, write_task_families
from curvedit.diagnostics.attack import RelearnOptions, quantization_rows, recall_and_perplexity, relearn_curve
from curvedit.diagnostics.converge import ConvergeOptions, plot_convergence, run_convergence
from curvedit.diagnostics.flat_energy import flat_energy_by_group, score_separation
from curvedit.diagnostics.frontier import FrontierOptions, run_frontier
from curvedit.editing.balanced_subnet import BSNOptions, bsn_within_budget
from curvedit.editing.budget import bisect_amount, match_tolerance
from curvedit.editing.edit import AppliedEdit, EditPlan, EditRule, apply_edit
from curvedit.editing.settings import EditSettings
from curvedit.editing.step import apply_step, step_at_cost
from curvedit.editing.sweep import SweepGrid, SweepOptions, matrices_spec, run_sweep
from curvedit.editing.targeted import attach_forget_masses, forget_masses
from curvedit.errors import CurveditError
from curvedit.evaluate.memorization import FindOptions, find_memorized
from curvedit.evaluate.perplexity import next_token_rankings
from curvedit.experiments.demo.measure import (
    FAMILIES,
    WorldProbe,
    heldout_sequences,
    measure,
    nonmember_strings,
    quote_windows,
    string_windows,
)
from curvedit.experiments.demo.report import write_report
from curvedit.experiments.demo.train import TrainConfig, cached_model_dir, train_demo_model
from curvedit.experiments.demo.world import (
    World,
    WorldConfig,
    build_world,
    evaluation_examples,
    fact_line,
    general_lines,
    pack,
)
from curvedit.experiments.stages import Timer
from curvedit.experiments.studies.capability_stages import run_layer_map
from curvedit.io import write_json
from curvedit.kfac.collect import CollectOptions, collect_factors
from curvedit.kfac.eigencorrect import eigencorrect_factors
from curvedit.kfac.factors import save_factors
from curvedit.kfac.spectrum import load_bases
from curvedit.kfac.targets import TargetSpec, select_targets
from curvedit.models import restored

if TYPE_CHECKING:
    from curvedit.editing.budget import BudgetSearch

SHIPPED_CHECKPOINT = Path(__file__).parent / "checkpoint"


class DemoError(CurveditError, RuntimeError):
    """A demo run that cannot reach its result (nothing memorized, no edit within the budget)."""


@dataclass
class DemoOptions:
    """Settings of the demo run.

    Attributes:
        out: output folder (report, results.json, factors, model cache).
        train: the demo model and its world.
        retrain: train even when a shipped or cached model matches `train`.
        prefix_chars: prompt length of memorized-string windows (the rest is the suffix).
        factor_tokens: tokens of general text for the factors.
        factor_memorized_share: share of factor tokens drawn from memorized strings and
            quotes (a real corpus holds any one memorized text at a vanishing share).
        layer_grid: layer groups tried on the tune half.
        matrices: target preset edited ("mlp": gate, up and down).
        keep_grid: fractions of components kept (by count) tried.
        rho_grid: fractions of curvature mass kept tried.
        ppl_budget: the chosen edit may raise perplexity to at most this times unedited.
        tests_per_family: fresh test items per reasoning family.
        heldout_lines: lines of fresh general text for perplexity.
        bsn_ratios: BalancedSubnet mask ratios tried (trained on the tune half); the one
            with the lowest tune recall within the perplexity budget is reported.
        bsn_epochs: BalancedSubnet epochs.
        bsn_lr: BalancedSubnet learning rate on the scores (the paper's 0.3 is for OLMo-7B;
            on the demo model it left recall untouched after 20 epochs at every ratio tried,
            3.0 removes it).
        attack_steps: fine-tuning steps after which the durability attacks re-measure recall
            (empty: no attacks).
        attack_lr: the attacker's AdamW learning rate (the demo model trained at 3e-3).
        attack_bits: quantization widths of the quantization attack.
        converge_tokens: token budgets of the convergence study (nested prefixes of the factors'
            text; the last is the reference; empty: none).
        seed: evaluation and control seed (also the factors' label-sampling seed).
        label_seeds: further label-sampling seeds of the factor collection: the chosen edit
            is re-applied with each one's factors to measure the spread of its outcome.
        layer_map_keep: the layer map's fixed keep fraction on mlp-in (`curvedit layer-map`:
            every single block and run of three edited alone; None: no map).
        frontier_keep: the keep fractions of the frontier (`curvedit frontier`: every method's
            held-out forgetting against its cost, at the chosen placement; --full).
        full: also the stages a first look does not need (`curvedit demo --full`, what
            `docs/demo/` holds): durability attacks, EK-FAC masses, the targeted edit,
            BalancedSubnet, the band analysis, the label-seed spread, the convergence study and
            the layer map and the frontier. Without it the demo measures the headline only: recitation,
            perplexity, privacy and families for K-FAC and the perplexity-matched controls.
        progress: show progress bars.
        all_candidates: measure recitation on every candidate window, memorized or not
            (for plumbing checks on models that memorized nothing).
    """

    out: Path = Path("demo-out")
    train: TrainConfig = field(default_factory=TrainConfig)
    retrain: bool = False
    prefix_chars: int = 32
    factor_tokens: int = 300_000
    factor_memorized_share: float = 0.01
    layer_grid: tuple[str, ...] = ("2-3", "1-3", "0-3")
    matrices: str = "mlp"
    keep_grid: tuple[float, ...] = (0.3, 0.5, 0.7)
    rho_grid: tuple[float, ...] = (0.99,)
    ppl_budget: float = 1.05
    tests_per_family: int = 300
    heldout_lines: int = 3000
    bsn_ratios: tuple[float, ...] = (0.03, 0.1)
    bsn_epochs: int = 20
    bsn_lr: float = 3.0
    attack_steps: tuple[int, ...] = (0, 10, 30, 100)
    attack_lr: float = 1e-3
    attack_bits: tuple[int, ...] = (8, 4)
    converge_tokens: tuple[int, ...] = (10_000, 30_000, 100_000, 300_000)
    seed: int = 0
    label_seeds: tuple[int, ...] = (1, 2)
    layer_map_keep: float | None = 0.5
    frontier_keep: tuple[float, ...] = (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
    full: bool = False
    progress: bool = True
    all_candidates: bool = False

    def validate(self) -> None:
        """Raise DemoError for amounts outside (0, 1], a perplexity budget below 1, or counts below 1."""
        shares = {"keep_grid": self.keep_grid, "rho_grid": self.rho_grid, "bsn_ratios": self.bsn_ratios,
                  "frontier_keep": self.frontier_keep,
                  "layer_map_keep": () if self.layer_map_keep is None else (self.layer_map_keep,)}
        for name, values in shares.items():
            if any(not 0 < v <= 1 for v in values):
                raise DemoError(f"{name} values must be in (0, 1], got {list(values)}")
        if not self.ppl_budget >= 1:
            raise DemoError(f"the perplexity budget is a ratio >= 1, got {self.ppl_budget}")
        counts = {"prefix_chars": self.prefix_chars, "factor_tokens": self.factor_tokens,
                  "tests_per_family": self.tests_per_family, "heldout_lines": self.heldout_lines,
                  "bsn_epochs": self.bsn_epochs}
        for name, value in counts.items():
            if value < 1:
                raise DemoError(f"{name} must be at least 1, got {value}")
        if not 0 <= self.factor_memorized_share < 1:
            raise DemoError(f"factor_memorized_share must be in [0, 1), got {self.factor_memorized_share}")
        if not self.layer_grid:
            raise DemoError("the layer grid needs at least one layer group")


def smoke_options(out: Path, full: bool = True) -> DemoOptions:
    """A configuration small enough for a test (seconds): every stage runs (only the headline's
    without `full`), nothing is learned."""
    world = WorldConfig(memorized=8, memorized_len=24, repetition_tiers=(4,), quotes=4, quote_repetitions=4,
                        facts_common=4, facts_rare=4, common_repetitions=4, rare_repetitions=2, general_lines=400)
    train = TrainConfig(world=world, hidden=32, layers=2, heads=2, intermediate=64, epochs=1, batch_size=16,
                        warmup_steps=5)
    return DemoOptions(out=out, train=train, prefix_chars=16, factor_tokens=4000, layer_grid=("1", "0-1"),
                       keep_grid=(0.5,), rho_grid=(0.99,), ppl_budget=10.0, tests_per_family=16,
                       bsn_ratios=(0.05,), bsn_epochs=1, label_seeds=(1,), attack_steps=(0, 2),
                       converge_tokens=(1000, 4000), frontier_keep=(0.5,),
                       heldout_lines=100, progress=False, all_candidates=True, full=full)


def demo_model_dir(options: DemoOptions) -> Path:
    """The shipped checkpoint when it matches the config, else a cached or new training."""
    wanted = options.train.config_hash()
    found = None if options.retrain else cached_model_dir(wanted, (SHIPPED_CHECKPOINT,
                                                                   options.out / "model-cache" / wanted))
    return found or train_demo_model(options.train, options.out / "model-cache" / wanted, progress=options.progress)


def factor_corpus(world: World, options: DemoOptions, rng: random.Random) -> list[str]:
    """General text for the factors: fresh reasoning lines, every fact once, and memorized
    strings/quotes at `factor_memorized_share` of the characters."""
    lines = general_lines(world, rng, options.factor_tokens // 12)
    lines += [fact_line(e, a) for e, a, _ in world.facts]
    budget = options.factor_memorized_share * sum(len(x) + 1 for x in lines)
    memorized_pool = world.memorized + world.quotes
    used = 0.0
    while used < budget:
        pick = rng.choice(memorized_pool)
        lines.append(pick)
        used += len(pick) + 1
    rng.shuffle(lines)
    return lines


def write_results_and_report(results: dict[str, Any], out: Path, timer: Timer,
                             write_report: Callable[[dict[str, Any], Path], Any]) -> dict[str, Any]:
    """Write `out/results.json`, then the report (timed as stage "report"), then
    `results.json` again with that time in `timings_s`.

    Returns:
        `results`, its `timings_s` updated.
    """
    write_json(out / "results.json", results)
    timer.stage("report", lambda: write_report(results, out))
    results["timings_s"] = timer.seconds
    write_json(out / "results.json", results)
    return results


def build_probe(world: World, tokenizer: Any, options: DemoOptions, memorized: dict[str, list]) -> WorldProbe:
    """Windows of the memorized sets, held-out text, fresh test items and never-trained strings
    (as many as the memorized strings, at least 24)."""
    nonmembers = nonmember_strings(world, max(len(world.memorized), 24), options.seed + 4)
    return WorldProbe(tune=memorized["tune"], heldout=memorized["heldout"], quotes=memorized["quotes"],
                      text=heldout_sequences(world, tokenizer, options.heldout_lines, options.train.seq_len,
                                             options.seed + 1),
                      tests=evaluation_examples(world, options.tests_per_family, options.seed + 2),
                      nonmembers=[tokenizer(s, add_special_tokens=False)["input_ids"] for s in nonmembers])


def find_world_memorized(model, tokenizer, world: World, options: DemoOptions) -> dict[str, list]:
    """Run `find_memorized` on each memorized set; keep the windows the model recites."""
    def records(strings: list[str]) -> list[Record]:
        return [Record(text=None, input_ids=tokenizer(s, add_special_tokens=False)["input_ids"], source="world",
                       index=i) for i, s in enumerate(strings)]

    length = options.train.world.memorized_len
    windows = FindOptions(prefix_len=options.prefix_chars, suffix_len=length - options.prefix_chars,
                          progress=False, batch_size=64)
    quotes = FindOptions(mode="quotes", suffix_len=1, progress=False, batch_size=64)
    found = {}
    for name, strings in (("tune", world.tune), ("heldout", world.heldout)):
        found[name] = [f.window for f in find_memorized(model, tokenizer, records(strings), windows).found]
    # quotes: the suffix is the speaker's name, whose length varies; find per length
    by_len: dict[int, list[str]] = {}
    for quote in world.quotes:
        by_len.setdefault(len(quote_windows([quote], tokenizer)[0].suffix_ids), []).append(quote)
    found["quotes"] = []
    for suffix_len, group in sorted(by_len.items()):
        found["quotes"] += [f.window for f in find_memorized(
            model, tokenizer, records(group), replace(quotes, suffix_len=suffix_len)).found]
    return found


def factor_sequences(tokenizer, world: World, options: DemoOptions) -> list[list[int]]:
    """The token sequences the factors are collected on (general text, see `factor_corpus`)."""
    rng = random.Random(options.seed + 3)
    sequences, total = [], 0
    for window in pack(factor_corpus(world, options, rng), options.train.seq_len):
        ids = tokenizer(window, add_special_tokens=False)["input_ids"]
        sequences.append(ids)
        total += len(ids)
        if total >= options.factor_tokens:
            break
    return sequences


def collect_world_factors(model, tokenizer, world: World, options: DemoOptions, targets,
                          label_seed: int | None = None) -> Path:
    """Factors (sampled labels) on the world's general text; written to `out/factors`, or to
    `out/factors-seed-S` for another label-sampling seed S (the same text)."""
    sequences = factor_sequences(tokenizer, world, options)
    seed = options.seed if label_seed is None else label_seed
    factors = collect_factors(model, lm_batches(sequences, 32, 0), targets, options=CollectOptions(
        seed=seed, progress=options.progress, total_tokens=sum(len(s) for s in sequences),
        description=f"demo world general text, {options.factor_memorized_share:.1%} memorized strings/quotes",
        extra={"seq_len": options.train.seq_len, "memorized_share": options.factor_memorized_share}))
    return save_factors(factors, options.out / ("factors" if label_seed is None else f"factors-seed-{seed}"))


def eigencorrect_world_factors(model, tokenizer, world: World, options: DemoOptions, targets, factor_dir: Path) -> None:
    """Add EK-FAC masses (`collect --eigencorrect`) to the demo's factors: a second pass over
    the same general text, same label seed."""
    sequences = factor_sequences(tokenizer, world, options)
    eigencorrect_factors(model, lm_batches(sequences, 32, 0), targets, factor_dir, options=CollectOptions(
        seed=options.seed, progress=options.progress, total_tokens=sum(len(s) for s in sequences),
        description="demo world general text (the factors' text)"))


def match_perplexity(model, probe: WorldProbe, targets, method: str, target_ppl: float, unedited_ppl: float, bases,
                     seed: int, steps: int = 14, masses: str = "kfac") -> "BudgetSearch":
    """Bisect the keep fraction of a control so its perplexity matches `target_ppl`
    (`curvedit.editing.budget.bisect_amount` in mode "match"), stopping once within 10% of the
    target's rise over `unedited_ppl`.

    Returns:
        The search: the first amount within that tolerance, else the closest tried
        (`search.matches()` says which).
    """
    return bisect_amount(model, targets, bases, probe.text, mode="match", target_ppl=target_ppl,
                         unedited_ppl=unedited_ppl, settings=EditSettings(method=method, masses=masses, seed=seed),
                         steps=steps,
                         tolerance=match_tolerance(target_ppl, unedited_ppl), batch_size=64)


def durability(model, world: World, tokenizer, probe: WorldProbe, options: DemoOptions) -> dict[str, Any]:
    """The durability attacks on the model as it is now (`curvedit.diagnostics.attack`): fine-tuning on
    fresh general text and on the tune half, re-measuring held-out recall and perplexity after
    `attack_steps`, and round-to-nearest quantization at `attack_bits` (groups of 32 inputs).
    The model is left as it was."""
    if not options.attack_steps:
        return {}

    def judge(m) -> dict[str, Any]:
        return recall_and_perplexity(m, probe.heldout, probe.text, batch_size=64)

    relearn = RelearnOptions(steps=options.attack_steps, lr=options.attack_lr, batch_size=16, seed=options.seed,
                             progress=False)
    general = heldout_sequences(world, tokenizer, 800, options.train.seq_len, options.seed + 5)
    tune = [w.prefix_ids + w.suffix_ids for w in probe.tune]
    return {"relearn_general": relearn_curve(model, general, judge, relearn),
            "relearn_tune": relearn_curve(model, tune, judge, relearn),
            "quantize": quantization_rows(model, judge, options.attack_bits, group_size=32)}


def run_bsn(model, tokenizer, probe: WorldProbe, targets, unedited_ppl: float,
            options: DemoOptions, while_applied: Callable[[], dict[str, Any]] | None = None
            ) -> tuple[dict[str, float], dict[str, Any]]:
    """BalancedSubnet with the tune half as forget set and general text as retain set, for
    each ratio in `bsn_ratios`; keeps the ratio with the lowest tune-half loose recall within
    the perplexity budget (the same rule the K-FAC sweep uses), or, if none fits, the one of
    lowest perplexity. `while_applied` runs on the BalancedSubnet model (its result is kept
    under "attacks"). The model is restored afterwards.

    Returns:
        (metrics of the kept ratio, its settings).
    """
    forget = [w.prefix_ids + w.suffix_ids for w in probe.tune]
    retain = probe.text[: max(len(forget) * 8, 64)]
    bsn = BSNOptions(epochs=options.bsn_epochs, lr=options.bsn_lr, seed=options.seed, progress=False)
    with restored(model, [t.module.weight for t in targets]):
        choice = bsn_within_budget(model, targets, forget, retain, probe.tune, probe.text, options.bsn_ratios,
                                   options.ppl_budget * unedited_ppl, bsn, batch_size=64)
        metrics = measure(model, tokenizer, probe)
        if while_applied is not None:
            metrics["attacks"] = while_applied()
    return metrics, {"ratio": choice.ratio, "tried": choice.tried, "epochs": options.bsn_epochs, "lr": options.bsn_lr,
                     "forget": f"{len(forget)} tune-half memorized windows",
                     "retain": f"{len(retain)} general sequences",
                     "note": (f"BalancedSubnet trained on the tune half; mask ratio {choice.ratio} chosen by lowest "
                              f"tune loose recall within the perplexity budget, from {list(options.bsn_ratios)}")}


def run_analysis(model, tokenizer, probe: WorldProbe, targets, bases, variants: dict[str, dict[str, Any]],
                 out: Path) -> None:
    """Band analysis (memorized held-out windows vs general text) and the task-family view
    (bottom-band share vs accuracy lost after the K-FAC edit), written to `out/analysis`."""
    band_options = BandOptions(batch_size=64, progress=False)
    band_analysis(model, targets, bases, probe.heldout, probe.text[:200], band_options).write(out / "analysis")
    families = {f: [tokenizer(e.prompt + e.answer, add_special_tokens=False)["input_ids"] for e in probe.tests[f]]
                for f in FAMILIES}
    drops = {f: variants["unedited"][f] - variants["kfac"][f] for f in FAMILIES}
    write_task_families(task_family_shares(model, targets, bases, families, drops, band_options), out / "analysis")


def run_demo(options: DemoOptions) -> dict[str, Any]:
    """Run the whole demo and write `results.json`, `report.md` and figures to `options.out`.

    Returns:
        The results: `{"variants": {name: metrics + settings + timings_s}, "world": ...,
        "settings": ..., "timings_s": ...}`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    options.validate()
    hf_logging.disable_progress_bar()  # the demo's model is tiny: loading bars are noise
    options.out.mkdir(parents=True, exist_ok=True)
    timer = Timer()
    model_dir = timer.stage("train_or_load", lambda: demo_model_dir(options))
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    world = build_world(options.train.world)

    memorized = timer.stage("find_memorized", lambda: find_world_memorized(model, tokenizer, world, options))
    found = {k: len(v) for k, v in memorized.items()}
    if options.all_candidates:
        memorized = {"tune": string_windows(world.tune, tokenizer, options.prefix_chars, "tune"),
                     "heldout": string_windows(world.heldout, tokenizer, options.prefix_chars, "heldout"),
                     "quotes": quote_windows(world.quotes, tokenizer)}
    elif not memorized["tune"] or not memorized["heldout"]:
        raise DemoError(f"the demo model recites {len(memorized['tune'])} tune and {len(memorized['heldout'])} "
                        "held-out strings; nothing to remove (train longer or with more repetitions)")
    probe = build_probe(world, tokenizer, options, memorized)
    all_targets = select_targets(model, TargetSpec(preset=options.matrices))
    factor_dir = timer.stage("collect", lambda: collect_world_factors(model, tokenizer, world, options, all_targets))
    bases = load_bases(all_targets, factor_dir)

    probe.rankings = next_token_rankings(model, probe.text[: probe.ndcg_sequences], batch_size=64)
    unedited = timer.stage("measure_unedited", lambda: measure(model, tokenizer, probe))
    grid = SweepGrid(layers=options.layer_grid, matrices=(options.matrices,), rho=options.rho_grid,
                     keep_fraction=options.keep_grid)
    sweep = timer.stage("sweep", lambda: run_sweep(model, tokenizer, factor_dir, grid, probe.tune, probe.text,
                                                   SweepOptions(ppl_budget=options.ppl_budget, batch_size=64,
                                                                progress=options.progress)))
    sweep.write(options.out / "sweep")
    if sweep.chosen is None:
        raise DemoError(f"no sweep point stays within {options.ppl_budget}x the unedited perplexity; "
                        f"see {options.out / 'sweep'}")
    chosen = sweep.points[sweep.chosen]
    targets = select_targets(model, matrices_spec(chosen.matrices, chosen.layers))
    rule = EditRule(**{chosen.amount_kind: chosen.amount})
    layer_map = None
    if options.full and options.layer_map_keep is not None:
        layer_map = timer.stage("layer_map", lambda: run_layer_map(
            model, tokenizer, factor_dir, probe.tune, probe.text, options.out, keep_fraction=options.layer_map_keep,
            tasks=(), batch_size=64, progress=options.progress))

    variants: dict[str, dict[str, Any]] = {"unedited": {**unedited, "settings": {}}}

    def attacks() -> dict[str, Any]:
        return durability(model, world, tokenizer, probe, options)

    if options.full:
        variants["unedited"]["attacks"] = timer.stage("attacks_unedited", attacks)

    def run_variant(name: str, plan: EditPlan, extra: dict[str, Any],
                    apply: Callable[[], AppliedEdit] | None = None) -> None:
        """Measure the model under `plan` (or the in-memory edit `apply` makes), then undo it."""
        start = time.perf_counter()
        applied = apply() if apply is not None else apply_edit(targets, plan, bases)
        metrics = measure(model, tokenizer, probe)
        if options.full and name in ATTACKED:
            metrics["attacks"] = attacks()
        applied.undo()
        kept = sum(s.kept for s in applied.stats)
        total = sum(s.total for s in applied.stats)
        variants[name] = {**metrics, "settings": {"layers": chosen.layers, "matrices": chosen.matrices,
                                                  "plan": plan.to_dict(), "kept_components": kept,
                                                  "total_components": total, **extra},
                          "timings_s": round(time.perf_counter() - start, 1)}

    timer.stage("kfac", lambda: run_variant("kfac", EditPlan([rule]), {}))
    random_settings = EditSettings(method="random", seed=options.seed)
    timer.stage("random", lambda: run_variant("random", EditPlan([rule], random_settings),
                                              {"note": "same number of components as kfac, chosen at random"}))
    kfac_ppl = variants["kfac"]["perplexity"]
    for name, method in (("random_ppl", "random"), ("svd", "svd")):
        search = timer.stage(f"{name}_match", lambda m=method: match_perplexity(
            model, probe, targets, m, kfac_ppl, unedited["perplexity"], bases, options.seed))
        timer.stage(name, lambda n=name, m=method, s=search: run_variant(
            n, EditPlan([s.rule()], EditSettings(method=m, seed=options.seed)),
            {"matched": s.matches(), "note": f"keep fraction {s.amount:.5f} chosen so perplexity matches kfac's "
                                             f"({s.perplexity:.4f} vs {kfac_ppl:.4f}; "
                                             f"{'within' if s.matches() else 'NOT within'} 10% of its rise)"}))

    score = timer.stage("flat_score", lambda: label_free_score(model, tokenizer, targets, bases, probe))
    if not options.full:
        results = {"variants": variants, "world": asdict(options.train.world), "memorized_found": found,
                   "flat_score": score,
                   "memorized_candidates": {"tune": len(world.tune), "heldout": len(world.heldout),
                                            "quotes": len(world.quotes)},
                   "settings": settings(options, model_dir, chosen), "full": False, "timings_s": timer.seconds}
        return write_results_and_report(results, options.out, timer, write_report)
    timer.stage("eigencorrect", lambda: eigencorrect_world_factors(model, tokenizer, world, options, targets,
                                                                   factor_dir))
    bases = load_bases(targets, factor_dir)  # now with the EK-FAC masses
    search = timer.stage("ekfac_match", lambda: match_perplexity(
        model, probe, targets, "kfac", kfac_ppl, unedited["perplexity"], bases, options.seed, masses="ekfac"))
    timer.stage("ekfac", lambda: run_variant(
        "ekfac", EditPlan([search.rule()], EditSettings(masses="ekfac")),
        {"matched": search.matches(), "note": f"EK-FAC masses, keep fraction {search.amount:.5f} chosen so perplexity "
                                              f"matches kfac's ({search.perplexity:.4f} vs {kfac_ppl:.4f}; "
                                              f"{'within' if search.matches() else 'NOT within'} 10% of its rise)"}))

    def targeted_search() -> Any:
        attach_forget_masses(bases, forget_masses(model, probe.tune, targets, bases, batch_size=64))
        return match_perplexity(model, probe, targets, "kfac", kfac_ppl, unedited["perplexity"], bases, options.seed,
                                masses="targeted")

    search = timer.stage("targeted_match", targeted_search)
    timer.stage("targeted", lambda: run_variant(
        "targeted", EditPlan([search.rule()], EditSettings(masses="targeted")),
        {"matched": search.matches(), "note": f"forget set = the tune half; components of highest forget/general "
                                              f"(EK-FAC) mass ratio removed, keep fraction {search.amount:.5f} chosen "
                                              f"so perplexity matches kfac's ({search.perplexity:.4f} vs "
                                              f"{kfac_ppl:.4f}; {'within' if search.matches() else 'NOT within'} "
                                              "10% of its rise)"}))

    step, norm, search = timer.stage("step_match", lambda: coherent_step(model, tokenizer, probe, targets, bases, rule,
                                                                        kfac_ppl, unedited["perplexity"]))
    timer.stage("step", lambda: run_variant(
        "step", EditPlan([rule]), {"step": {"norm": norm, "deletion_norm": step.deletion_norm,
                                            "gradient_share_in_block": step.gradient_share},
                                   "note": f"one coherent step up the tune half's suffix loss in the block K-FAC "
                                           f"deletes, norm {norm:.4g} ({norm / step.deletion_norm:.2f} x the "
                                           "deletion's), the largest within kfac's perplexity"},
        apply=lambda: apply_step(targets, step, norm)))

    start = time.perf_counter()
    bsn_metrics, bsn_settings = timer.stage("bsn", lambda: run_bsn(model, tokenizer, probe, targets,
                                                                   unedited["perplexity"], options, attacks))
    variants["bsn"] = {**bsn_metrics,
                       "settings": {"layers": chosen.layers, "matrices": chosen.matrices, **bsn_settings},
                       "timings_s": round(time.perf_counter() - start, 1)}
    timer.stage("analysis", lambda: run_analysis(model, tokenizer, probe, targets, bases, variants, options.out))
    label_seeds = timer.stage("label_seeds", lambda: label_seed_spread(model, tokenizer, world, probe, targets,
                                                                       EditPlan([rule]), variants["kfac"], options))

    frontier = timer.stage("frontier", lambda: demo_frontier(model, tokenizer, factor_dir, targets, probe, options))
    convergence = timer.stage("converge", lambda: converge_study(model, tokenizer, world, probe, targets, rule,
                                                                options))
    results = {
        "variants": variants,
        "convergence": convergence,
        "world": asdict(options.train.world),
        "memorized_found": found,
        "memorized_candidates": {"tune": len(world.tune), "heldout": len(world.heldout), "quotes": len(world.quotes)},
        "settings": settings(options, model_dir, chosen),
        "full": True,
        "label_seeds": label_seeds,
        "layer_map": layer_map,
        "frontier": frontier,
        "flat_score": score,
        "timings_s": timer.seconds,
    }
    return write_results_and_report(results, options.out, timer, write_report)


def label_free_score(model, tokenizer, targets, bases, probe: WorldProbe, flat_fraction: float = 0.5
                     ) -> dict[str, Any]:
    """The flat-energy share as a label-free memorization score (`curvedit score`): every
    memorized window (tune, held-out, quotes) against never-trained strings of the same kind and
    against fresh general text, at the chosen placement's K-FAC eigenbases.

    Returns:
        Per comparison, the AUROC with its bootstrap interval and the share of the other group
        a screen keeping 99% of the memorized windows would skip; the groups' mean shares.
    """
    members = [w.prefix_ids + w.suffix_ids for w in probe.tune + probe.heldout + probe.quotes]
    general = probe.text[: 2 * len(members)]
    groups = {"memorized": members, "nonmembers": probe.nonmembers, "general": general}
    shares = flat_energy_by_group(model, targets, bases, [s for g in groups.values() for s in g],
                                  [name for name, g in groups.items() for _ in g], flat_fraction=flat_fraction,
                                  batch_size=64, pad_id=default_pad_id(tokenizer))
    out: dict[str, Any] = {"flat_fraction": flat_fraction,
                           "mean": {name: sum(v) / len(v) for name, v in shares.items()},
                           "n": {name: len(v) for name, v in shares.items()}}
    for other in ("nonmembers", "general"):
        out[f"vs_{other}"] = score_separation([(shares["memorized"], shares[other])])
    return out


def coherent_step(model, tokenizer, probe: WorldProbe, targets, bases, rule: EditRule, kfac_ppl: float,
                  unedited_ppl: float) -> tuple[Any, float, Any]:
    """The coherent step from the tune half (`curvedit.editing.step`) in the block the chosen K-FAC
    edit deletes, at the largest norm (up to 4x the deletion's) within K-FAC's perplexity."""
    return step_at_cost(model, targets, bases, rule, probe.tune, probe.text, budget=kfac_ppl / unedited_ppl,
                        unedited_ppl=unedited_ppl, steps=14, pad_id=default_pad_id(tokenizer), batch_size=64)


def demo_frontier(model, tokenizer, factor_dir: Path, targets, probe: WorldProbe, options: DemoOptions
                  ) -> dict[str, Any]:
    """Every method's forgetting of the held-out memorized strings against its cost, at the
    chosen placement (`curvedit.diagnostics.frontier`), written to `out/frontier/`."""
    result = run_frontier(model, tokenizer, factor_dir, targets, probe.heldout, probe.text,
                          FrontierOptions(keep_fractions=options.frontier_keep,
                                          settings=EditSettings(seed=options.seed), batch_size=64,
                                          progress=options.progress))
    result.write(options.out / "frontier")
    return result.to_dict()


def settings(options: DemoOptions, model_dir: Path, chosen: Any) -> dict[str, Any]:
    """The run's settings and the sweep's chosen point, for results.json."""
    return {"model_dir": str(model_dir), "train": asdict(options.train), "factor_tokens": options.factor_tokens,
            "factor_memorized_share": options.factor_memorized_share, "ppl_budget": options.ppl_budget,
            "chosen": {"layers": chosen.layers, "matrices": chosen.matrices, "amount_kind": chosen.amount_kind,
                       "amount": chosen.amount, "tune_loose": chosen.loose, "perplexity": chosen.perplexity},
            "prefix_chars": options.prefix_chars, "attack_lr": options.attack_lr}


def converge_study(model, tokenizer, world: World, probe: WorldProbe, targets, rule: EditRule,
                   options: DemoOptions) -> dict[str, Any] | None:
    """`curvedit converge` on the demo: factors on nested prefixes of the factors' text, each
    budget's selection (the chosen rule, on the chosen targets) against the largest, gold vs
    sampled labels, and the held-out recall and perplexity of the edit made with each."""
    if not options.converge_tokens:
        return None
    result = run_convergence(model, factor_sequences(tokenizer, world, options), targets, options.out / "converge",
                             ConvergeOptions(budgets=options.converge_tokens, rule=rule, batch_size=32,
                                             seed=options.seed, progress=options.progress),
                             evaluate=lambda m: recall_and_perplexity(m, probe.heldout, probe.text, batch_size=64))
    plot_convergence(result, options.out / "converge.png")
    return result


# and unedited, bsn: the durability attacks run on these
ATTACKED = ("kfac", "ekfac", "targeted", "step", "svd", "random_ppl")

SPREAD_KEYS = ("memorized_heldout_strict", "memorized_heldout_loose", "quotes_loose", "perplexity")


def label_seed_spread(model, tokenizer, world: World, probe: WorldProbe, targets, plan: EditPlan,
                      kfac: dict[str, Any], options: DemoOptions) -> dict[str, Any]:
    """The chosen K-FAC edit with factors collected under other label-sampling seeds (same
    text, same plan): held-out and quote recall and perplexity per seed, and their range
    over all seeds (the main run's included)."""
    per_seed = {str(options.seed): {k: kfac[k] for k in SPREAD_KEYS}}
    for seed in options.label_seeds:
        factor_dir = collect_world_factors(model, tokenizer, world, options, targets, label_seed=seed)
        applied = apply_edit(targets, plan, load_bases(targets, factor_dir))
        try:
            metrics = measure(model, tokenizer, probe, ("heldout", "quotes", "perplexity"))
        finally:
            applied.undo()
        per_seed[str(seed)] = {k: metrics[k] for k in SPREAD_KEYS}
    spread = {k: {"min": min(r[k] for r in per_seed.values()), "max": max(r[k] for r in per_seed.values())}
              for k in SPREAD_KEYS}
    return {"per_seed": per_seed, "spread": spread}
