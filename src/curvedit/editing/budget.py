"""Choose how much to keep by held-out perplexity instead of by a fixed amount.

On real models `rho` is coarse (most curvature mass sits in a few components, so a
moderate `rho` can keep a few percent of the components and cost tens of percent of
perplexity), while the kept fraction of components is smooth. A perplexity budget is the
knob that transfers between models: bisect the amount (a `keep_fraction` or a `rho`, on
[0, 1], 1.0 keeping everything) until the held-out perplexity of the edited model is
where it should be.

Modes:
- "within": the strongest edit, i.e. the smallest amount tried, whose perplexity is at
  most the target (`budget` x the unedited perplexity). Every candidate is applied in
  memory, measured and undone bit for bit (also when the measurement fails).
- "match": the amount whose perplexity is closest (relatively) to the target, e.g. a
  control matched to the perplexity K-FAC reached.

Perplexity is assumed to rise as less is kept: a candidate within the target moves the
search down, one above it moves the search up. After `steps` candidates the result is
resolved to `2**-steps`; in mode "within", the chosen amount fits and the amount one
resolution step below it was measured not to fit (unless the chosen one is the smallest
amount tried). When no candidate below 1.0 fits, the result is 1.0: no edit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn
from tqdm.auto import tqdm

from curvedit.editing.edit import AppliedEdit, EditPlan, EditRule, apply_edit, method_bases
from curvedit.editing.settings import EditSettings
from curvedit.errors import CurveditError
from curvedit.evaluate.perplexity import perplexity
from curvedit.kfac.spectrum import Eigenbasis, SelectionError
from curvedit.kfac.targets import Target

KNOBS = ("keep_fraction", "rho")
MODES = ("within", "match")


class BudgetError(CurveditError):
    """A perplexity-budget search that cannot be run as asked."""


@dataclass(frozen=True)
class BudgetStep:
    """One candidate of the search.

    Attributes:
        amount: the knob value tried, in (0, 1).
        perplexity: held-out perplexity of the model edited at `amount`.
        kept: components kept, summed over the targets.
        total: components in all, summed over the targets.
        fits: perplexity at most the target.
    """

    amount: float
    perplexity: float
    kept: int
    total: int
    fits: bool


MATCH_SHARE = 0.1  # a matched control lands within 10% of the target's perplexity rise


def match_tolerance(target_ppl: float, unedited_ppl: float, share: float = MATCH_SHARE) -> float:
    """The relative tolerance of `bisect_amount` that stops a "match" search within `share`
    of the target's perplexity rise over unedited."""
    return share * abs(target_ppl - unedited_ppl) / target_ppl


@dataclass
class BudgetSearch:
    """The outcome of `bisect_amount`.

    Attributes:
        mode: "within" or "match".
        knob: "keep_fraction" or "rho".
        method: the edit method searched.
        amount: the chosen knob value (1.0 = keep everything, no edit).
        perplexity: held-out perplexity at `amount` (the unedited one when `amount` is 1.0).
        unedited_perplexity: held-out perplexity of the unedited model.
        target_perplexity: the perplexity aimed at.
        ppl_budget: the target as a multiple of `unedited_perplexity`, when given so.
        edited: whether the chosen amount removes anything (False: none fits in mode "within",
            or no tried amount removed a component, as when an SVD keep fraction just below 1
            rounds to every singular value).
        steps: every candidate, in the order tried.
    """

    mode: str
    knob: str
    method: str
    amount: float
    perplexity: float
    unedited_perplexity: float
    target_perplexity: float
    ppl_budget: float | None
    edited: bool
    steps: list[BudgetStep] = field(default_factory=list)

    def matches(self, share: float = MATCH_SHARE) -> bool:
        """Whether a "match" search reached its target: an edit whose perplexity is within
        `share` of the target's rise over unedited (10%: a control matched to an edit that
        raised perplexity by 4% lands within 0.4%)."""
        rise = self.target_perplexity - self.unedited_perplexity
        return self.edited and abs(self.perplexity - self.target_perplexity) <= share * abs(rise)

    def rule(self, pattern: str = "*") -> EditRule:
        """The edit rule of the chosen amount, for targets matching `pattern`."""
        return EditRule(pattern, **{self.knob: self.amount})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every field, steps as a list of dicts, plus `ppl_ratio` (chosen
        perplexity / unedited)."""
        return {**asdict(self), "ppl_ratio": self.perplexity / self.unedited_perplexity}

    def table(self) -> str:
        """The candidates as a text table (one row per step, then the choice)."""
        lines = [f"{'step':>4} {self.knob:>13} {'kept':>10} {'of':>10} {'perplexity':>11} {'x unedited':>10}  fits"]
        for index, step in enumerate(self.steps, 1):
            lines.append(f"{index:>4} {step.amount:>13.6f} {step.kept:>10} {step.total:>10} {step.perplexity:>11.4f} "
                         f"{step.perplexity / self.unedited_perplexity:>10.4f}  {'yes' if step.fits else 'no'}")
        target = (f"x{self.ppl_budget:g} of unedited {self.unedited_perplexity:.4f}" if self.ppl_budget is not None
                  else f"unedited {self.unedited_perplexity:.4f}")
        lines.append(f"chosen {self.knob}={self.amount:g}: perplexity {self.perplexity:.4f}, target "
                     f"{self.target_perplexity:.4f} ({target})" + ("" if self.edited else "; no edit"))
        return "\n".join(lines)


def _validate(heldout: Sequence[Sequence[int]], targets: list[Target], mode: str, knob: str, budget: float | None,
              target_ppl: float | None, steps: int, tolerance: float, batch_size: int) -> None:
    """Raises: BudgetError: see `bisect_amount`."""
    if mode not in MODES:
        raise BudgetError(f"unknown mode {mode!r}; choose one of {MODES}")
    if knob not in KNOBS:
        raise BudgetError(f"unknown budget knob {knob!r}; choose one of {KNOBS}")
    if (budget is None) == (target_ppl is None):
        raise BudgetError("give exactly one of a perplexity budget and a target perplexity")
    if budget is not None and not (math.isfinite(budget) and budget >= 1):
        raise BudgetError(f"the perplexity budget is a ratio to the unedited perplexity, at least 1, got {budget}")
    if target_ppl is not None and not (math.isfinite(target_ppl) and target_ppl > 0):
        raise BudgetError(f"the target perplexity must be positive, got {target_ppl}")
    if not heldout:
        raise BudgetError("the perplexity budget needs at least one held-out sequence")
    if not targets:
        raise BudgetError("the perplexity budget needs at least one target to edit")
    if steps < 1 or batch_size < 1 or not tolerance >= 0:
        raise BudgetError(f"steps and batch_size must be >= 1 and tolerance >= 0, got {steps}, {batch_size}, "
                          f"{tolerance}")


def bisect_amount(
    model: nn.Module,
    targets: list[Target],
    bases: dict[str, Eigenbasis] | None,
    heldout_sequences: Sequence[Sequence[int]],
    *,
    mode: str = "within",
    budget: float | None = None,
    target_ppl: float | None = None,
    unedited_ppl: float | None = None,
    knob: str = "keep_fraction",
    settings: EditSettings | None = None,
    steps: int = 10,
    tolerance: float = 0.0,
    batch_size: int = 16,
    pad_id: int = 0,
    progress: bool = False,
) -> BudgetSearch:
    """Bisect the amount kept (one value for all `targets`) by held-out perplexity.

    Each candidate is applied in memory (`curvedit.editing.edit.apply_edit`), its perplexity
    measured, and undone; the model is left bit-identical, also when a measurement fails.

    Args:
        model: the unedited HF causal LM (the bases must come from these weights).
        targets: the weights edited together (one group, one amount).
        bases: name -> eigenbasis for every target (None only for method "svd").
        heldout_sequences: held-out token sequences for perplexity.
        mode: "within" (smallest amount whose perplexity is at most the target) or
            "match" (the tried amount whose perplexity is closest to the target; never the
            unedited model, even when it is closer: a matched control must be an edit).
        budget: the target as a ratio to the unedited perplexity (>= 1; 1.1 = 10% above).
        target_ppl: the target as a perplexity (instead of `budget`).
        unedited_ppl: the unedited model's perplexity on `heldout_sequences`, when known
            (measured otherwise).
        knob: "keep_fraction" (share of components by count) or "rho" (share of mass).
        settings: how each candidate edit is made (`EditSettings`; None: the defaults).
        steps: candidates at most (the amount is resolved to `2**-steps`).
        tolerance: stop early once a candidate's perplexity is within this relative
            distance of the target (in mode "within", only a candidate that fits); 0 runs
            every step.
        batch_size: sequences per forward pass.
        pad_id: padding id.
        progress: show a progress bar over the steps.

    Returns:
        A `BudgetSearch` with the chosen amount, its perplexity and every step.

    Raises:
        BudgetError: an unknown mode or knob, both or neither of `budget` and
            `target_ppl`, a budget below 1, no held-out sequence, no target, or bad sizes.
        curvedit.editing.edit.EditError: an unknown method, or a target without eigenbasis.
    """
    _validate(heldout_sequences, targets, mode, knob, budget, target_ppl, steps, tolerance, batch_size)

    settings = settings or EditSettings()

    def plan(amount: float) -> EditPlan:
        return EditPlan([EditRule("*", **{knob: amount})], settings)

    def measure() -> float:
        return perplexity(model, heldout_sequences, pad_id=pad_id, batch_size=batch_size).perplexity

    plan(1.0)  # an unknown method or dtype fails before any measurement
    unedited = measure() if unedited_ppl is None else unedited_ppl
    target = budget * unedited if budget is not None else target_ppl
    found = bisect_edit(edit_at(targets, plan, bases), measure, target, mode=mode,
                        gap=lambda ppl: abs(ppl / target - 1), steps=steps, tolerance=tolerance, progress=progress,
                        description=f"{knob} for ppl {target:.4g}")
    tried = [BudgetStep(amount=step.amount, perplexity=step.value, kept=step.kept, total=step.total, fits=step.fits)
             for step in found.steps]
    return BudgetSearch(mode=mode, knob=knob, method=settings.method, amount=found.amount,
                        perplexity=found.value if found.edited else unedited, unedited_perplexity=unedited,
                        target_perplexity=target, ppl_budget=budget, edited=found.edited, steps=tried)


@dataclass(frozen=True)
class BisectionStep:
    """One candidate of `bisect_edit`: the amount tried, the measured value, the components
    kept and in all (summed over the targets), and whether the value is at most the target."""

    amount: float
    value: float
    kept: int
    total: int
    fits: bool


@dataclass
class Bisection:
    """The outcome of `bisect_edit`.

    Attributes:
        amount: the chosen amount (1.0 when no candidate was chosen).
        value: the measured value at `amount` (None when nothing was chosen).
        edited: whether a candidate that removes something was chosen.
        steps: every candidate, in the order tried.
    """

    amount: float
    value: float | None
    edited: bool
    steps: list[BisectionStep]


def edit_at(targets: list[Target], plan: Callable[[float], EditPlan], bases: dict[str, Eigenbasis] | None
            ) -> Callable[[float], AppliedEdit]:
    """Amount -> `apply_edit` of `plan(amount)` on `targets` (what `bisect_edit` applies)."""
    return lambda amount: apply_edit(targets, plan(amount), bases)


def bisect_edit(apply: Callable[[float], AppliedEdit], measure: Callable[[], float], target: float, *, mode: str,
                gap: Callable[[float], float], steps: int, tolerance: float = 0.0, progress: bool = False,
                description: str = "bisect") -> Bisection:
    """Bisect the amount kept, on (0, 1), for a measured value that rises as less is kept
    (held-out perplexity, held-out error).

    Each candidate is applied in memory, measured and undone bit for bit (also when the
    measurement fails). A candidate whose value is at most `target` moves the search down,
    one above it moves it up.

    Args:
        apply: amount -> the edit applied in memory (`edit_at` for an edit plan; any
            `AppliedEdit`, such as a coherent step of a norm that grows as the amount falls).
        measure: the value of the model as it is now.
        target: the value aimed at.
        mode: "within" (the smallest amount whose value is at most `target`), "match"
            (the amount whose value is closest to `target` by `gap`) or "least" (the largest
            amount whose value is at least `target`: the least edit that reaches it, e.g. a
            recall brought down to a bound, with the value -recall).
        gap: value -> its distance from the target.
        steps: candidates at most (resolution `2**-steps`).
        tolerance: stop once a candidate that removes something is within this `gap` (in
            mode "within", only one that fits); 0 runs every step.
        progress: show a progress bar.
        description: the progress bar's label.

    Returns:
        The chosen amount and every step. Only candidates that remove at least one
        component can be chosen: an SVD keep fraction just below 1 may keep everything.
        An amount that would keep nothing at all (an SVD keep fraction below one singular
        value) is skipped as too strong, without a step.
    """
    amount, reached, edited = 1.0, None, False
    lo, hi = 0.0, 1.0
    tried: list[BisectionStep] = []
    bar = tqdm(range(steps), unit="step", desc=description, disable=not progress)
    for _ in bar:
        mid = (lo + hi) / 2
        try:
            applied = apply(mid)
        except SelectionError:  # an amount that keeps nothing (SVD below one singular value): too strong
            lo = mid
            continue
        try:
            value = measure()
        finally:
            applied.undo()
        fits = value >= target if mode == "least" else value <= target
        step = BisectionStep(amount=mid, value=value, kept=sum(s.kept for s in applied.stats),
                             total=sum(s.total for s in applied.stats), fits=fits)
        tried.append(step)
        removes = step.kept < step.total
        if removes and (fits if mode in ("within", "least") else not edited or gap(value) < gap(reached)):
            amount, reached, edited = mid, value, True
        bar.set_postfix(amount=f"{mid:.4f}", value=f"{value:.4f}")
        keep_more = fits if mode == "least" else not fits  # "least" climbs while it reaches the target
        lo, hi = (mid, hi) if keep_more else (lo, mid)
        if removes and gap(value) <= tolerance and (fits or mode == "match"):
            break
    return Bisection(amount=amount, value=reached, edited=edited, steps=tried)


def edit_within_budget(
    model: nn.Module,
    targets: list[Target],
    factor_dir: str | Path | None,
    heldout_sequences: Sequence[Sequence[int]],
    *,
    budget: float,
    knob: str = "keep_fraction",
    settings: EditSettings | None = None,
    forget: Sequence[Any] | None = None,
    protect_dir: str | Path | None = None,
    steps: int = 10,
    batch_size: int = 16,
    pad_id: int = 0,
    progress: bool = False,
) -> tuple[BudgetSearch, AppliedEdit]:
    """The strongest edit within `budget` x the unedited perplexity, applied in place:
    load the (cached) eigenbases, `bisect_amount` in mode "within", apply the chosen amount.

    Args:
        model: the unedited HF causal LM (the factors must come from these weights).
        targets: the weights edited together, with one amount.
        factor_dir: the factor directory (may be None only for method "svd").
        heldout_sequences: held-out token sequences for perplexity.
        budget: allowed perplexity ratio to the unedited model (>= 1).
        knob: "keep_fraction" or "rho".
        settings: how the edit is made (`EditSettings`: method, masses, seed, dtypes, device).
        forget: the forget set's windows, for masses "targeted".
        protect_dir: protect factors (`curvedit.editing.protect`): their top mass, at each bisected
            amount, is kept too.
        steps: bisection steps (resolution `2**-steps`).
        batch_size: sequences per forward pass.
        pad_id: padding id.
        progress: show a progress bar over the steps.

    Returns:
        (the search, the `AppliedEdit` of the chosen amount; `.undo()` restores the model).
        When no amount below 1.0 fits, the edit keeps everything (`search.edited` is False).

    Raises:
        BudgetError: see `bisect_amount`.
        curvedit.editing.edit.EditError: no factor directory for a method that needs one.
        curvedit.kfac.factors.FactorError: factors missing or of another model.
    """
    settings = settings or EditSettings()
    bases = method_bases(model, targets, factor_dir, settings, forget=forget, pad_id=pad_id, protect_dir=protect_dir)
    search = bisect_amount(model, targets, bases, heldout_sequences, mode="within", budget=budget, knob=knob,
                           settings=settings, steps=steps, batch_size=batch_size, pad_id=pad_id, progress=progress)
    return search, apply_edit(targets, EditPlan([search.rule()], settings), bases)
