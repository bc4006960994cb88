"""Sweep edit settings, find the memorization / perplexity Pareto front, pick a point.

A grid is the product of layer groups ("23-25", "0,3"), matrix selections (a preset such
as "mlp-in" or a glob / `re:` pattern on module names) and amounts (`rho` values and/or
`keep_fraction` values). Every point is applied in memory (`curvedit.editing.edit.apply_edit`),
evaluated, and undone bit for bit: nothing is written to disk and the model is never
reloaded. Eigenbases are computed (or read from the factor directory's cache) once per
target for the whole grid.

Per point the sweep records the recitation metrics on a memorized set (strict, loose,
average normalized Levenshtein distance) and the held-out perplexity, plus what the edit
kept. The *memorization value* that the front and the choice minimise is, by `metric`:
"strict" or "loose" accuracy, or "similarity" = 1 - average normalized distance.

Pareto front: a point is on it when no other point is at least as good on both
memorization and perplexity and strictly better on one; points with identical values do
not dominate each other (both stay on the front). The chosen point is the one of lowest
memorization among those whose perplexity is at most `budget` times the unedited one,
ties going to the lower perplexity, then to grid order; without a probe floor it is always
on the front.

Probe floor (`SweepOptions.probe_floor`, with task probes such as the capability suite):
every point and the unedited model are also scored on the probes; the families the unedited
model gets clearly above chance (`curvedit.evaluate.capabilities.score_families`) are the
usable ones, and a point qualifies for the choice only when each usable family keeps at
least its floor of its unedited accuracy. The floor is one share for every family, or a
share per family (`{"open_book": 0.9, "facts_common": 0.7}`; "*" sets the others; a family
with no floor is measured, not held). Each point that does not qualify records why
(`SweepPoint.excluded`): over the perplexity budget, or the families below their floors.

Bisection mode (`SweepOptions.bisect_budget`): instead of grid amounts, each (layer group
x matrices) cell gets one point, at the strongest edit within the perplexity budget
(`curvedit.editing.budget.bisect_amount` on the keep fraction or rho); its steps are recorded in
the point's `bisection`. These points go through the same front and choice.

Resume (`run_sweep(journal=...)`): each finished point is appended to a journal
(`curvedit.io.Journal`) keyed by everything the points depend on (the targets' weights, the
factors, the grid, the options, the memorized windows, the held-out text and the probes); a
rerun with the same journal reads those points back and evaluates only the rest, and a journal
of another sweep is refused. The journal is removed when the sweep returns.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from curvedit.data import default_pad_id
from curvedit.editing.budget import KNOBS, bisect_amount
from curvedit.editing.edit import EditError, EditPlan, EditRule, apply_edit, method_bases
from curvedit.editing.settings import EditSettings
from curvedit.errors import CurveditError
from curvedit.evaluate.capabilities import score_families
from curvedit.evaluate.memorization import evaluate_recitation
from curvedit.evaluate.perplexity import perplexity
from curvedit.evaluate.privacy import suffix_nll
from curvedit.evaluate.tasks import Task, TaskOptions, TaskResult, run_tasks
from curvedit.evaluate.windows import Window
from curvedit.io import Journal, digest, write_json
from curvedit.kfac.factors import model_identity
from curvedit.kfac.targets import PRESETS, Target, TargetError, TargetSpec, parse_layers, select_targets
from curvedit.plots import pyplot, save_figure, spans

METRICS = ("strict", "loose", "similarity")
SWEEP_JSON = "sweep.json"
SWEEP_PNG = "sweep.png"
SWEEP_JOURNAL = "sweep.journal.jsonl"  # the finished points of an unfinished sweep (`run_sweep(journal=...)`)


class SweepError(CurveditError):
    """A grid or sweep request that cannot be run as asked."""


@dataclass(frozen=True)
class SweepGrid:
    """The settings to try: the product of layer groups, matrix selections and amounts.

    Attributes:
        layers: layer groups, each like "23-25" or "0,3" (one edit touches all its layers).
        matrices: matrix selections: a preset ("mlp", "mlp-in", "mlp-out") or a module-name
            glob / `re:REGEX` pattern.
        rho: curvature-mass fractions to keep, each in (0, 1] (empty when bisecting).
        keep_fraction: component-count fractions to keep, each in (0, 1] (empty when
            bisecting).
    """

    layers: tuple[str, ...]
    matrices: tuple[str, ...] = ("mlp-in",)
    rho: tuple[float, ...] = ()
    keep_fraction: tuple[float, ...] = ()

    def validate(self, bisect: bool = False) -> None:
        """Check the grid.

        Args:
            bisect: the amounts are bisected per cell (`SweepOptions.bisect_budget`), so
                the grid must not give any.

        Raises:
            SweepError: an empty axis, amounts given or missing for the mode, an amount
                outside (0, 1], an unknown method.
            curvedit.kfac.targets.TargetError: a malformed layer group.
        """
        if not self.layers:
            raise SweepError("the grid needs at least one layer group")
        if not self.matrices:
            raise SweepError("the grid needs at least one matrix selection")
        if bisect and (self.rho or self.keep_fraction):
            raise SweepError("bisecting under the perplexity budget chooses the amount of each cell: "
                             "give no rho or keep-fraction values")
        if not bisect and not self.rho and not self.keep_fraction:
            raise SweepError("the grid needs at least one rho or keep-fraction value "
                             "(or bisect the amount under the perplexity budget)")
        for name, values in (("rho", self.rho), ("keep_fraction", self.keep_fraction)):
            bad = [v for v in values if not 0 < v <= 1]
            if bad:
                raise SweepError(f"{name} values must be in (0, 1], got {bad}")
        for group in self.layers:
            parse_layers(group)

    def settings(self) -> list[tuple[str, str, str, float]]:
        """Every point of the grid as (layers, matrices, amount kind, amount), in grid order
        (layers outermost, then matrices, then rho values, then keep fractions)."""
        amounts = [("rho", v) for v in self.rho] + [("keep_fraction", v) for v in self.keep_fraction]
        return [(layers, matrices, kind, value)
                for layers, matrices, (kind, value) in itertools.product(self.layers, self.matrices, amounts)]


def matrices_spec(matrices: str, layers: str | None) -> TargetSpec:
    """The `TargetSpec` of a matrix selection: a preset name or one glob / `re:` pattern."""
    if matrices in PRESETS:
        return TargetSpec(preset=matrices, layers=layers)
    return TargetSpec(patterns=(matrices,), layers=layers)


@dataclass
class SweepOptions:
    """How the sweep evaluates and chooses.

    Attributes:
        metric: the memorization value to minimise: "strict", "loose" or "similarity"
            (1 - average normalized Levenshtein distance).
        ppl_budget: the chosen point's perplexity is at most this times the unedited one
            (1.1 = 10% above); None chooses nothing.
        loose_threshold: loose accuracy counts 1 - d/L >= this.
        batch_size: sequences per forward pass / decoding batch.
        settings: how every point's edit is made (method, masses, seed, dtypes, device).
        progress: show a progress bar over the points.
        bisect_budget: instead of the grid's amounts, bisect one amount per (layers x
            matrices) cell: the strongest edit within `ppl_budget` (needs a budget >= 1).
        bisect_knob: what is bisected: "keep_fraction" or "rho".
        bisect_steps: bisection steps per cell (resolution `2**-steps`).
        probe_floor: with task probes, a point qualifies only when every usable family keeps
            at least its floor of its unedited accuracy: one share for every family, or family
            -> share ("*": every other family; a family without a floor is not held). None:
            probes are measured, not used. A float is stored as {"*": float}.
        probe_margin: a family is usable when the lower end of its unedited accuracy's 95%
            interval is this far above chance.
    """

    metric: str = "loose"
    ppl_budget: float | None = 1.1
    loose_threshold: float = 0.75
    batch_size: int = 16
    settings: EditSettings = field(default_factory=EditSettings)
    progress: bool = True
    bisect_budget: bool = False
    bisect_knob: str = "keep_fraction"
    bisect_steps: int = 10
    probe_floor: dict[str, float] | None = None
    probe_margin: float = 0.1

    def __post_init__(self) -> None:
        """Store a single probe floor as {"*": floor}."""
        self.probe_floor = floor_map(self.probe_floor)

    def validate(self) -> None:
        """Raises: SweepError: an unknown metric or masses, a non-positive budget, or bisection
        without a budget >= 1, with an unknown knob or fewer than 1 step."""
        if not 0 < self.loose_threshold <= 1:
            raise SweepError(f"the loose threshold is a share of the suffix in (0, 1], got {self.loose_threshold}")
        if self.metric not in METRICS:
            raise SweepError(f"unknown metric {self.metric!r}; choose one of {METRICS}")
        try:
            self.settings.validate()
        except EditError as err:
            raise SweepError(str(err)) from None
        for family, share in (self.probe_floor or {}).items():
            if not 0 < share <= 1:
                where = "" if family == "*" else f" of {family}"
                raise SweepError(f"the probe floor{where} is a share of the unedited accuracy in (0, 1], got {share}")
        if self.ppl_budget is not None and not self.ppl_budget > 0:
            raise SweepError(f"the perplexity budget must be positive, got {self.ppl_budget}")
        if self.bisect_budget:
            if self.ppl_budget is None or not self.ppl_budget >= 1:
                raise SweepError(f"bisecting needs a perplexity budget of at least 1, got {self.ppl_budget}")
            if self.bisect_knob not in KNOBS:
                raise SweepError(f"unknown bisection knob {self.bisect_knob!r}; choose one of {KNOBS}")
            if self.bisect_steps < 1:
                raise SweepError(f"bisection needs at least 1 step, got {self.bisect_steps}")


@dataclass
class SweepPoint:
    """One evaluated setting (or the unedited model, with empty setting fields).

    Attributes:
        layers: the layer group.
        matrices: the matrix selection.
        amount_kind: "rho" or "keep_fraction" ("" for the unedited model).
        amount: the value.
        method: the edit method.
        strict: strict recitation accuracy on the memorized set.
        loose: loose recitation accuracy.
        avg_normalized_distance: mean d / L (higher = less memorization).
        suffix_nll: the memorized windows' mean loss per suffix token, teacher-forced
            (`curvedit.evaluate.privacy.suffix_nll`; higher = held less firmly).
        perplexity: held-out perplexity.
        kept: components kept, summed over the point's targets.
        total: components in all, summed over the point's targets.
        targets: target name -> its edit statistics (kept, total, mass_kept, rel_change).
        bisection: in bisection mode, the search that chose `amount`
            (`curvedit.editing.budget.BudgetSearch.to_dict`: target, steps, ...); else None.
        probes: task probe accuracy per family (empty without probes).
        excluded: why the point cannot be chosen ("" when it qualifies, or when no budget is set).
    """

    layers: str = ""
    matrices: str = ""
    amount_kind: str = ""
    amount: float = 1.0
    method: str = ""
    strict: float = 0.0
    loose: float = 0.0
    avg_normalized_distance: float = 0.0
    suffix_nll: float = 0.0
    perplexity: float = 0.0
    kept: int = 0
    total: int = 0
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)
    bisection: dict[str, Any] | None = None
    probes: dict[str, float] = field(default_factory=dict)
    excluded: str = ""

    @property
    def label(self) -> str:
        """A short description, e.g. "layers 2-3 mlp-in rho=0.9"."""
        if not self.amount_kind:
            return "unedited"
        return f"layers {self.layers} {self.matrices} {self.amount_kind}={self.amount:g}"


def memorization_value(point: SweepPoint, metric: str = "loose") -> float:
    """The memorization a point leaves (lower = less memorization).

    Args:
        point: an evaluated point.
        metric: "strict", "loose" or "similarity" (1 - average normalized distance).

    Returns:
        The value in [0, 1].

    Raises:
        SweepError: an unknown metric.
    """
    if metric == "strict":
        return point.strict
    if metric == "loose":
        return point.loose
    if metric == "similarity":
        return 1.0 - point.avg_normalized_distance
    raise SweepError(f"unknown metric {metric!r}; choose one of {METRICS}")


def _objectives(points: Sequence[SweepPoint], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(memorization, perplexity) arrays; a NaN counts as the worst value (+inf)."""
    mem = np.array([memorization_value(p, metric) for p in points], dtype=np.float64)
    ppl = np.array([p.perplexity for p in points], dtype=np.float64)
    return np.nan_to_num(mem, nan=np.inf), np.nan_to_num(ppl, nan=np.inf)


def pareto_front(points: Sequence[SweepPoint], metric: str = "loose") -> list[int]:
    """Indices of the points no other point dominates on (memorization, perplexity).

    q dominates p when q is no worse on both and strictly better on at least one; equal
    points do not dominate each other. NaN values count as +inf.

    Args:
        points: evaluated points.
        metric: which memorization value to minimise (see `memorization_value`).

    Returns:
        Indices into `points`, by increasing perplexity (ties: increasing memorization,
        then index).
    """
    if not points:
        return []
    mem, ppl = _objectives(points, metric)
    no_worse = (mem[None, :] <= mem[:, None]) & (ppl[None, :] <= ppl[:, None])  # [p, q]: q no worse than p
    better = (mem[None, :] < mem[:, None]) | (ppl[None, :] < ppl[:, None])
    dominated = (no_worse & better).any(axis=1)
    front = np.flatnonzero(~dominated)
    return sorted(front.tolist(), key=lambda i: (ppl[i], mem[i], i))


def floor_map(floor: float | Mapping[str, float] | None) -> dict[str, float] | None:
    """A probe floor as family -> share: a single share becomes {"*": share}; None stays None."""
    if floor is None:
        return None
    if isinstance(floor, Mapping):
        return {str(k): float(v) for k, v in floor.items()}
    return {"*": float(floor)}


def parse_probe_floor(values: Sequence[str]) -> dict[str, float] | None:
    """`--probe-floor` values: "0.7" (every family) or "FAMILY=0.9", repeatable.

    Raises:
        SweepError: a value that is neither a share nor FAMILY=share, or a family given twice.
    """
    floor: dict[str, float] = {}
    for value in values:
        family, sep, share = value.rpartition("=") if "=" in value else ("*", "", value)
        try:
            number = float(share)
        except ValueError:
            raise SweepError(f"--probe-floor expects a share (0.7) or FAMILY=share (open_book=0.9), got {value!r}"
                             ) from None
        if not family or family in floor:
            raise SweepError(f"--probe-floor {value!r}: " + ("no family before '='" if not family
                                                             else f"{family} is given twice"))
        floor[family] = number
    return floor or None


def family_floor(probe_floor: Mapping[str, float] | None, family: str) -> float | None:
    """The share `family` must keep under `probe_floor` (its own, else "*"), or None."""
    if probe_floor is None:
        return None
    return probe_floor.get(family, probe_floor.get("*"))


def exclusion(point: SweepPoint, baseline: SweepPoint, budget: float,
              probe_floor: float | Mapping[str, float] | None = None, usable: Sequence[str] = ()) -> str:
    """Why a point cannot be chosen, or "" when it qualifies.

    Args:
        point: an evaluated point.
        baseline: the unedited model's point (its perplexity and probe accuracy).
        budget: allowed perplexity ratio.
        probe_floor: the share of unedited accuracy every usable family must keep, or family
            -> share ("*": the others; see `SweepOptions.probe_floor`); None: no floor.
        usable: the families the floor applies to.

    Returns:
        "" or a reason such as "perplexity 1.081x > 1.05x; add_1d kept 41% < 90%".
    """
    reasons, probe_floor = [], floor_map(probe_floor)
    ratio = point.perplexity / baseline.perplexity
    if not ratio <= budget:  # NaN fails too
        reasons.append(f"perplexity {ratio:.3f}x > {budget:g}x")
    for family in usable:
        floor = family_floor(probe_floor, family)
        if floor is None:
            continue
        kept = point.probes.get(family, float("nan")) / baseline.probes[family]
        if not kept >= floor:
            reasons.append(f"{family} kept {kept:.0%} < {floor:.0%}")
    return "; ".join(reasons)


def choose_point(points: Sequence[SweepPoint], baseline_ppl: float, budget: float, metric: str = "loose",
                 allowed: Sequence[bool] | None = None) -> int | None:
    """The point of least memorization whose perplexity is within the budget.

    Args:
        points: evaluated points.
        baseline_ppl: the unedited model's perplexity.
        budget: allowed perplexity ratio (1.1: at most 10% above `baseline_ppl`).
        metric: which memorization value to minimise.
        allowed: per point, whether it passes the other conditions (a probe floor); None: all do.

    Returns:
        The index of the chosen point (ties: lower perplexity, then earlier index), or
        None when no allowed point is within the budget.

    Raises:
        SweepError: a non-positive budget or baseline perplexity.
    """
    if not budget > 0 or not baseline_ppl > 0:
        raise SweepError(f"budget and baseline perplexity must be positive, got {budget} and {baseline_ppl}")
    mem, ppl = _objectives(points, metric)
    allowed = [i for i in range(len(points)) if ppl[i] <= budget * baseline_ppl and (allowed is None or allowed[i])]
    if not allowed:
        return None
    return min(allowed, key=lambda i: (mem[i], ppl[i], i))


@dataclass
class SweepResult:
    """All points of a sweep, the unedited baseline, the front and the chosen point.

    Attributes:
        grid: the grid swept.
        options: the options used.
        baseline: the unedited model's metrics.
        points: evaluated points, in grid order.
        front: indices of the Pareto-front points (by increasing perplexity).
        chosen: index of the chosen point, or None (no budget, or nothing within it).
        usable_probes: the probe families the floor applies to (those the unedited model gets
            clearly above chance; empty without probes).
    """

    grid: SweepGrid
    options: SweepOptions
    baseline: SweepPoint
    points: list[SweepPoint]
    front: list[int]
    chosen: int | None
    usable_probes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: grid, options, baseline, and every point with `on_front`, `chosen`,
        its memorization value and perplexity ratio to the baseline."""
        front = set(self.front)

        def row(point: SweepPoint, index: int | None) -> dict[str, Any]:
            return {**asdict(point), "label": point.label,
                    "memorization": memorization_value(point, self.options.metric),
                    "ppl_ratio": point.perplexity / self.baseline.perplexity,
                    **({"on_front": index in front, "chosen": index == self.chosen} if index is not None else {})}

        return {"grid": asdict(self.grid), "options": asdict(self.options), "baseline": row(self.baseline, None),
                "points": [row(p, i) for i, p in enumerate(self.points)], "front": self.front, "chosen": self.chosen,
                "usable_probes": self.usable_probes}

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write `sweep.json` and `sweep.png` into `out_dir` (created if missing).

        Returns:
            (JSON path, PNG path).
        """
        out = Path(out_dir)
        write_json(out / SWEEP_JSON, self.to_dict())
        return out / SWEEP_JSON, plot_sweep(self, out / SWEEP_PNG)


def _evaluate(model: nn.Module, tokenizer: Any, windows: Sequence[Window], heldout: Sequence[Sequence[int]],
              tasks: Sequence[Task], pad_id: int, options: SweepOptions) -> tuple[dict[str, Any], list[TaskResult]]:
    """A point's metrics (probe accuracy per family under "probes"), and the probes' results."""
    recitation, _ = evaluate_recitation(model, windows, pad_id=pad_id, batch_size=options.batch_size,
                                        loose_threshold=options.loose_threshold)
    ppl = perplexity(model, heldout, pad_id=pad_id, batch_size=options.batch_size)
    held = suffix_nll(model, windows, pad_id=pad_id, batch_size=options.batch_size)
    results = (run_tasks(model, tokenizer, tasks, TaskOptions(batch_size=options.batch_size), pad_id=pad_id)
               if tasks else [])
    return {"strict": recitation.strict, "loose": recitation.loose,
            "avg_normalized_distance": recitation.avg_normalized_distance, "suffix_nll": held,
            "perplexity": ppl.perplexity,
            "probes": {r.name: r.accuracy for r in results}}, results


def run_sweep(model: nn.Module, tokenizer: Any | None, factor_dir: str | Path | None, grid: SweepGrid,
              memorized_windows: Sequence[Window], heldout_sequences: Sequence[Sequence[int]],
              options: SweepOptions | None = None, tasks: Sequence[Task] = (),
              protect_dir: str | Path | None = None, journal: str | Path | None = None) -> SweepResult:
    """Evaluate every grid point in memory (edit, evaluate, undo) and mark front and choice.

    With `options.bisect_budget`, each (layers x matrices) cell gives one point instead,
    at the amount `curvedit.editing.budget.bisect_amount` chooses within `options.ppl_budget`.
    The model is left exactly as it was (every edit is undone bit for bit, also when an
    evaluation fails).

    Args:
        model: the unedited HF causal LM (the factors must come from these weights).
        tokenizer: its tokenizer (for the padding id); may be None.
        factor_dir: the factor directory (may be None only for method "svd").
        grid: the settings to try.
        memorized_windows: prefix/suffix windows the model recites (e.g. from
            `curvedit.evaluate.windows.read_memorized`).
        heldout_sequences: held-out token sequences for perplexity.
        options: `SweepOptions`.
        tasks: task probes scored at every point (`curvedit.evaluate.capabilities.capability_tasks`
            or `curvedit.evaluate.tasks.load_tasks`); needed by `options.probe_floor`.
        protect_dir: protect factors (`curvedit.editing.protect`): every point also keeps their top mass
            at its own amount.
        journal: a file each finished point is recorded in; a rerun with the same file and the
            same sweep reads those points back (see the module docstring). Removed on return.

    Returns:
        A `SweepResult` (call `.write(out_dir)` for JSON + PNG).

    Raises:
        SweepError: an invalid grid or options, no memorized window, no held-out sequence,
            a grid point that selects no target, or a probe floor without probes (or with
            no family the unedited model gets clearly above chance).
        curvedit.kfac.factors.FactorError: factors that do not match the model.
        curvedit.io.JournalError: a journal of another sweep.
    """
    options = options or SweepOptions()
    options.validate()
    grid.validate(bisect=options.bisect_budget)
    if not memorized_windows:
        raise SweepError("the sweep needs at least one memorized window")
    if not heldout_sequences:
        raise SweepError("the sweep needs held-out sequences for perplexity")
    if options.probe_floor is not None and not tasks:
        raise SweepError("a probe floor needs task probes (--tasks)")
    unknown = sorted(set(options.probe_floor or {}) - {"*"} - {t.name for t in tasks})
    if unknown:
        raise SweepError(f"the probe floor names {', '.join(unknown)}, which the probes do not have "
                         f"(they have: {', '.join(t.name for t in tasks)})")
    point_targets: dict[tuple[str, str], list[Target]] = {}
    for layers, matrices in itertools.product(grid.layers, grid.matrices):
        try:
            point_targets[layers, matrices] = select_targets(model, matrices_spec(matrices, layers))
        except TargetError as err:
            raise SweepError(f"grid point layers={layers!r} matrices={matrices!r}: {err}") from None
    union = list({t.name: t for targets in point_targets.values() for t in targets}.values())
    record = None if journal is None else Journal(journal, journal_key(  # another sweep's: refused before any work
        model, union, memorized_windows, heldout_sequences, tasks, folders=(factor_dir, protect_dir), options=options,
        grid=grid), "sweep")
    try:
        bases = method_bases(model, union, factor_dir, options.settings, protect_dir=protect_dir)
    except EditError as err:  # a method that needs factors without any, or protection it cannot take
        raise SweepError(str(err)) from None
    pad_id = default_pad_id(tokenizer)
    if record is not None and record.items:
        baseline, usable = SweepPoint(**record.items[0]["baseline"]), record.items[0]["usable"]
    else:
        unedited, unedited_probes = _evaluate(model, tokenizer, memorized_windows, heldout_sequences, tasks, pad_id,
                                              options)
        baseline = SweepPoint(**unedited)
        usable = [s.family for s in score_families(unedited_probes, options.probe_margin) if s.usable]
        if record is not None:
            record.append({"baseline": asdict(baseline), "usable": usable})
    if options.probe_floor is not None and not any(family_floor(options.probe_floor, f) for f in usable):
        raise SweepError("no probe family the floor holds is clearly above chance on the unedited model, so the "
                         "floor has nothing to hold ("
                         f"{', '.join(f'{k} {v:.0%}' for k, v in baseline.probes.items())})")
    # bisection: one setting per cell, its amount (1.0 here) chosen below
    settings = ([(*cell, options.bisect_knob, 1.0) for cell in point_targets] if options.bisect_budget
                else grid.settings())
    points = [SweepPoint(**item) for item in record.items[1:]] if record is not None else []
    bar = tqdm(settings[len(points):], unit="point", desc="sweep", disable=not options.progress,
               total=len(settings), initial=len(points))
    for layers, matrices, kind, value in bar:
        bisection = None
        if options.bisect_budget:
            search = bisect_amount(model, point_targets[layers, matrices], bases, heldout_sequences, mode="within",
                                   budget=options.ppl_budget, unedited_ppl=baseline.perplexity, knob=kind,
                                   settings=options.settings, steps=options.bisect_steps,
                                   batch_size=options.batch_size, pad_id=pad_id)
            value, bisection = search.amount, search.to_dict()
        plan = EditPlan([EditRule("*", **{kind: value})], options.settings)
        applied = apply_edit(point_targets[layers, matrices], plan, bases)
        try:
            metrics, _ = _evaluate(model, tokenizer, memorized_windows, heldout_sequences, tasks, pad_id, options)
        finally:
            applied.undo()
        stats = {s.name: {"kept": s.kept, "total": s.total, "mass_kept": s.mass_kept, "rel_change": s.rel_change}
                 for s in applied.stats}
        points.append(SweepPoint(layers=layers, matrices=matrices, amount_kind=kind, amount=value,
                                 method=options.settings.method,
                                 kept=sum(s.kept for s in applied.stats), total=sum(s.total for s in applied.stats),
                                 targets=stats, bisection=bisection, **metrics))
        if record is not None:
            record.append(asdict(points[-1]))
        bar.set_postfix(**{options.metric: f"{memorization_value(points[-1], options.metric):.3f}",
                           "ppl": f"{metrics['perplexity']:.3f}"})
    front = pareto_front(points, options.metric)
    chosen = None
    if options.ppl_budget is not None:
        for point in points:
            point.excluded = exclusion(point, baseline, options.ppl_budget, options.probe_floor, usable)
        chosen = choose_point(points, baseline.perplexity, options.ppl_budget, options.metric,
                              allowed=[not p.excluded for p in points])
    if record is not None:
        record.remove()
    return SweepResult(grid=grid, options=options, baseline=baseline, points=points, front=front, chosen=chosen,
                       usable_probes=usable)


def journal_key(model: nn.Module, targets: Sequence[Target], windows: Sequence[Window],
                heldout: Sequence[Sequence[int]], tasks: Sequence[Task], *, folders: Sequence[str | Path | None],
                options: Any, grid: SweepGrid | None = None) -> str:
    """What an in-memory edit-and-measure job (a sweep, a frontier) depends on, as one digest:
    the key of its journal (`curvedit.io.Journal`).

    Args:
        model: the model (its config, the targets' weights, and every weight's sum and sum of squares).
        targets: the targets the job edits.
        windows: the memorized windows it measures.
        heldout: the held-out sequences.
        tasks: the task probes.
        folders: factor folders (their `factors.json`; None: no folder).
        options: the job's options dataclass (every field but `progress`, which changes no point).
        grid: the sweep's grid, if any.
    """
    def factors(folder: str | Path | None) -> str | None:
        meta = None if folder is None else Path(folder) / "factors.json"
        return None if meta is None or not meta.is_file() else digest(meta.read_text())

    weights = {k: v for k, v in model_identity(model, list(targets)).items() if k != "name"}  # not where it was read
    with torch.no_grad():  # every other weight by its sums: the points depend on the whole model
        sums = [[name, float(w.double().sum()), float(w.double().square().sum())]
                for name, w in model.named_parameters()]
    return digest({"model": weights, "all weights": sums, "factors": [factors(f) for f in folders],
                   "options": {k: v for k, v in asdict(options).items() if k != "progress"},
                   "grid": None if grid is None else asdict(grid),
                   "windows": [[list(w.prefix_ids), list(w.suffix_ids)] for w in windows],
                   "heldout": [list(s) for s in heldout],
                   "tasks": [[t.name, [asdict(item) for item in t.items]] for t in tasks]})


def plot_sweep(result: SweepResult, out: str | Path) -> Path:
    """Memorization vs perplexity: every point (red x: below the probe floor), the front
    (line), the chosen point (star), the unedited model (cross) and the perplexity budget
    (dashed line). Writes a PNG.

    Returns:
        The PNG path.
    """
    plt = pyplot()
    metric = result.options.metric
    mem = [100 * memorization_value(p, metric) for p in result.points]
    ppl = [p.perplexity for p in result.points]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    floored = [i for i, p in enumerate(result.points) if p.excluded and "kept" in p.excluded]
    others = [i for i in range(len(result.points)) if i not in floored]
    ax.scatter([ppl[i] for i in others], [mem[i] for i in others], s=22, color="0.65", label="grid points", zorder=2)
    if floored:
        ax.scatter([ppl[i] for i in floored], [mem[i] for i in floored], s=30, marker="x", color="tab:red",
                   label="below the probe floor", zorder=2)
    front_x = [ppl[i] for i in result.front]
    front_y = [mem[i] for i in result.front]
    ax.plot(front_x, front_y, "-o", color="tab:blue", ms=5, lw=1.2, label="Pareto front", zorder=3)
    base = result.baseline
    ax.scatter([base.perplexity], [100 * memorization_value(base, metric)], marker="X", s=80, color="k",
               label="unedited", zorder=4)
    if result.options.ppl_budget is not None:
        limit = result.options.ppl_budget * base.perplexity
        ax.axvline(limit, color="tab:red", ls="--", lw=1, label=f"budget x{result.options.ppl_budget:g}")
    if result.chosen is not None:
        chosen = result.points[result.chosen]
        ax.scatter([ppl[result.chosen]], [mem[result.chosen]], marker="*", s=220, color="tab:orange",
                   edgecolor="k", label=f"chosen: {chosen.label}", zorder=5)
    if spans(ppl + [base.perplexity], 3.0):
        ax.set_xscale("log")
    ax.set_xlabel("held-out perplexity")
    ax.set_ylabel(f"memorization ({metric}, %)")
    ax.set_title(f"{result.options.settings.method} sweep: {len(result.points)} points, "
                 f"{len(result.front)} on the front",
                 fontsize=10)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out)
