"""Is curvature the lever? Every edit method on one frontier (`curvedit frontier`).

For one placement (a set of targets) and a range of amounts (keep fractions), each method's
edit is applied in memory, measured and undone bit for bit:

- forgetting: strict and loose recall of held-out memorized windows (windows the choice of
  amount never saw), with 95% Wilson intervals;
- cost: the mean loss increase on general text in nats per predicted token,
  `sum_s (NLL'_s - NLL_s) / sum_s tokens_s = log(ppl' / ppl)`, with a paired bootstrap 95%
  interval over the held-out sequences; with task probes, the accuracy points lost per family.

A method whose curve lies below another's (less recall at the same cost) is the better lever;
curves that coincide say the basis or ranking does not matter. Methods (`FRONTIER_METHODS`):
"kfac" (components of the K-FAC eigenbasis ranked by `lam_i mu_j`), "saliency" (the same
basis ranked by `lam_i mu_j C_ij^2`, Optimal Brain Damage's second-order cost), "magnitude"
(the standard basis ranked by `W_ij^2`: magnitude pruning), "noise" (Gaussian noise of the
K-FAC edit's Frobenius norm, in the block that edit removes), "random" (as many eigenbasis
components as K-FAC keeps, chosen at random) and "svd" (singular-value truncation).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from torch import nn
from tqdm.auto import tqdm

from curvedit.data import default_pad_id
from curvedit.editing.edit import EditPlan, EditRule, apply_edit, method_bases
from curvedit.editing.settings import EditSettings
from curvedit.editing.sweep import journal_key
from curvedit.errors import CurveditError
from curvedit.evaluate.intervals import bootstrap_ratio, wilson
from curvedit.evaluate.memorization import evaluate_recitation
from curvedit.evaluate.perplexity import PerplexityResult, perplexity
from curvedit.evaluate.tasks import Task, TaskOptions, run_tasks
from curvedit.evaluate.windows import Window
from curvedit.io import Journal, write_json
from curvedit.kfac.targets import Target
from curvedit.plots import pyplot, save_figure

# name -> (edit method, component ranking)
FRONTIER_METHODS: dict[str, tuple[str, str]] = {"kfac": ("kfac", "kfac"), "saliency": ("kfac", "saliency"),
                                                "magnitude": ("identity", "saliency"), "noise": ("noise", "kfac"),
                                                "random": ("random", "kfac"), "svd": ("svd", "kfac")}
FRONTIER_JSON = "frontier.json"
FRONTIER_JOURNAL = "frontier.journal.jsonl"  # the finished points of an unfinished frontier
FRONTIER_PNG = "frontier.png"


class FrontierError(CurveditError):
    """A frontier that cannot be traced as asked."""


@dataclass
class FrontierOptions:
    """What the frontier traces.

    Attributes:
        methods: names from `FRONTIER_METHODS`.
        keep_fractions: amounts, each in (0, 1): the share of components (singular values for
            svd; weight entries for magnitude) kept.
        settings: the seed of the random and noise controls, the basis change's dtype and the
            device (`EditSettings`; each method sets its own method and masses).
        batch_size: sequences per forward pass / decoding batch.
        loose_threshold: loose recall counts `1 - d/L >=` this.
        progress: show a progress bar over the points.
    """

    methods: tuple[str, ...] = tuple(FRONTIER_METHODS)
    keep_fractions: tuple[float, ...] = (0.99, 0.95, 0.9, 0.8, 0.6, 0.4)
    settings: EditSettings = field(default_factory=EditSettings)
    batch_size: int = 16
    loose_threshold: float = 0.75
    progress: bool = True

    def validate(self) -> None:
        """Raises: FrontierError: an unknown method, no method or amount, an amount outside (0, 1)."""
        unknown = [m for m in self.methods if m not in FRONTIER_METHODS]
        if unknown or not self.methods:
            raise FrontierError(f"unknown frontier method(s) {unknown or '(none given)'}; choose from "
                                f"{list(FRONTIER_METHODS)}")
        bad = [k for k in self.keep_fractions if not 0 < k < 1]
        if bad or not self.keep_fractions:
            raise FrontierError(f"keep fractions must be in (0, 1) (1 edits nothing), got {list(self.keep_fractions)}")


@dataclass
class FrontierPoint:
    """One method at one amount (or the unedited model, method "unedited").

    Attributes:
        method: the frontier method.
        keep_fraction: the amount (1.0 for the unedited model).
        kept: components kept, summed over the targets.
        total: components in all.
        strict: held-out strict recall, Wilson interval (value, low, high, n).
        loose: held-out loose recall, Wilson interval.
        nats: mean loss increase per general token against unedited, bootstrap interval.
        perplexity: held-out perplexity.
        probes: task accuracy per family.
        probe_points_lost: per family, 100 x (unedited - edited accuracy).
    """

    method: str
    keep_fraction: float
    kept: int
    total: int
    strict: dict[str, Any]
    loose: dict[str, Any]
    nats: dict[str, Any]
    perplexity: float
    probes: dict[str, float] = field(default_factory=dict)
    probe_points_lost: dict[str, float] = field(default_factory=dict)


@dataclass
class FrontierResult:
    """Every point of the frontier, and the unedited model."""

    options: FrontierOptions
    baseline: FrontierPoint
    points: list[FrontierPoint]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"options": asdict(self.options), "baseline": asdict(self.baseline),
                "points": [asdict(p) for p in self.points]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FrontierResult":
        """The result back from `to_dict`'s form (frontier.json)."""
        opts = {k: tuple(v) if isinstance(v, list) else v for k, v in data["options"].items()}
        flat = {k: opts.pop(k) for k in ("seed", "compute_dtype") if k in opts}  # frontier.json before EditSettings
        opts["settings"] = EditSettings(**(opts.get("settings") or flat))
        return cls(options=FrontierOptions(**opts), baseline=FrontierPoint(**data["baseline"]),
                   points=[FrontierPoint(**p) for p in data["points"]])

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write `frontier.json` and `frontier.png`; returns their paths."""
        out = Path(out_dir)
        write_json(out / FRONTIER_JSON, self.to_dict())
        return out / FRONTIER_JSON, plot_frontier(self, out / FRONTIER_PNG)

    def best_within(self, nats: float) -> dict[str, FrontierPoint | None]:
        """Per method, its point of lowest loose recall (then strict, then cost) among those
        costing at most `nats` per token; None where every point costs more."""
        best: dict[str, FrontierPoint | None] = {}
        for method in self.options.methods:
            fits = [p for p in self.points if p.method == method and p.nats["value"] <= nats]
            best[method] = min(fits, key=lambda p: (p.loose["value"], p.strict["value"], p.nats["value"]),
                               default=None)
        return best

    def compare_within(self, nats: float, reference: str = "kfac") -> dict[str, str]:
        """Where `reference`'s frontier lies against each other method's, judged by their points of
        lowest loose recall within `nats` per token (`best_within`) and their 95% intervals.

        Returns:
            Per other method: "below" (the reference's loose interval lies wholly under the
            method's: it removes clearly more at that cost), "above" (wholly over it), "on"
            (the intervals overlap: no clear difference), or "beyond the cost" (every point of
            the method costs more); for the reference itself, "beyond the cost" when it has no
            point within `nats`, else nothing.

        Raises:
            FrontierError: `reference` is not one of the traced methods.
        """
        if reference not in self.options.methods:
            raise FrontierError(f"no method {reference!r} on this frontier (it traced {list(self.options.methods)})")
        best = self.best_within(nats)
        ref = best[reference]
        if ref is None:
            return {reference: "beyond the cost"}
        relation: dict[str, str] = {}
        for method, point in best.items():
            if method == reference:
                continue
            if point is None:
                relation[method] = "beyond the cost"
            elif ref.loose["high"] < point.loose["low"]:
                relation[method] = "below"
            elif ref.loose["low"] > point.loose["high"]:
                relation[method] = "above"
            else:
                relation[method] = "on"
        return relation

    def table(self) -> str:
        """The points as a text table."""
        lines = [f"{'method':<10} {'keep':>6} {'strict':>8} {'loose':>8} {'nats/token':>24}"]
        for p in [self.baseline, *self.points]:
            n = p.nats
            lines.append(f"{p.method:<10} {p.keep_fraction:>6.3f} {p.strict['value']:>8.3f} {p.loose['value']:>8.3f} "
                         f"{n['value']:>10.5f} [{n['low']:.5f}, {n['high']:.5f}]")
        return "\n".join(lines)


def _nats(edited: PerplexityResult, unedited: PerplexityResult) -> dict[str, Any]:
    """Mean loss increase per token with its paired bootstrap interval over sequences."""
    diffs = [a - b for a, b in zip(edited.sequence_nll, unedited.sequence_nll)]
    return bootstrap_ratio(diffs, list(unedited.sequence_tokens)).to_dict()


def run_frontier(model: nn.Module, tokenizer: Any | None, factor_dir: str | Path | None, targets: list[Target],
                 windows: Sequence[Window], heldout: Sequence[Sequence[int]], options: FrontierOptions | None = None,
                 tasks: Sequence[Task] = (), journal: str | Path | None = None) -> FrontierResult:
    """Trace every method's forgetting against its cost (module docstring); the model is left
    exactly as it was.

    Args:
        model: the unedited HF causal LM (the factors must come from these weights).
        tokenizer: its tokenizer (padding, task probes); may be None without tasks.
        factor_dir: the factor folder (may be None when only "magnitude" and "svd" are traced).
        targets: the placement, edited together at each amount.
        windows: held-out memorized windows.
        heldout: general held-out token sequences.
        options: `FrontierOptions`.
        tasks: task probes (e.g. `curvedit capabilities`); optional.
        journal: a file each finished point is recorded in; a rerun with the same file and the
            same frontier measures only the points left (`curvedit.io.Journal`). Removed on return.

    Returns:
        The `FrontierResult`.

    Raises:
        FrontierError: bad options, no window, no held-out sequence or no target.
        curvedit.editing.edit.EditError, curvedit.kfac.factors.FactorError: factors missing or of another model.
        curvedit.io.JournalError: a journal of another frontier.
    """
    options = options or FrontierOptions()
    options.validate()
    if not windows or not heldout or not targets:
        raise FrontierError("the frontier needs memorized windows, held-out sequences and at least one target")
    pad_id = default_pad_id(tokenizer)
    record = None if journal is None else Journal(journal, journal_key(
        model, targets, windows, heldout, tasks, folders=(factor_dir,), options=options), "frontier")
    kinds = {"identity": "identity", "svd": "svd"}  # every other method edits in the K-FAC eigenbasis
    needs = {kinds.get(FRONTIER_METHODS[m][0], "kfac") for m in options.methods}
    loaded = {kind: method_bases(model, targets, factor_dir, replace(
        options.settings, method=kind, masses="saliency" if kind == "identity" else "kfac")) for kind in needs}

    def measure(method: str, amount: float, kept: int, total: int, base: PerplexityResult | None,
                base_probes: dict[str, float]) -> tuple[FrontierPoint, PerplexityResult]:
        recitation, _ = evaluate_recitation(model, windows, pad_id=pad_id, batch_size=options.batch_size,
                                            loose_threshold=options.loose_threshold)
        ppl = perplexity(model, heldout, pad_id=pad_id, batch_size=options.batch_size)
        probes = ({r.name: r.accuracy for r in run_tasks(model, tokenizer, tasks, TaskOptions(
            batch_size=options.batch_size), pad_id=pad_id)} if tasks else {})
        n = len(windows)
        point = FrontierPoint(method=method, keep_fraction=amount, kept=kept, total=total,
                              strict=wilson(round(recitation.strict * n), n).to_dict(),
                              loose=wilson(round(recitation.loose * n), n).to_dict(),
                              nats=_nats(ppl, base if base is not None else ppl), perplexity=ppl.perplexity,
                              probes=probes, probe_points_lost={f: 100 * (base_probes[f] - a) for f, a in
                                                                probes.items() if f in base_probes})
        return point, ppl

    total = sum(math.prod(t.shape_oi) for t in targets)
    baseline, base_ppl = measure("unedited", 1.0, total, total, None, {})
    points = [FrontierPoint(**item) for item in record.items] if record is not None else []
    settings = [(m, k) for m in options.methods for k in options.keep_fractions]
    for name, amount in tqdm(settings[len(points):], unit="point", desc="frontier", disable=not options.progress,
                             total=len(settings), initial=len(points)):
        method, masses = FRONTIER_METHODS[name]
        plan = EditPlan([EditRule("*", keep_fraction=amount)], replace(options.settings, method=method, masses=masses))
        applied = apply_edit(targets, plan, loaded[kinds.get(method, "kfac")])
        try:
            point, _ = measure(name, amount, sum(s.kept for s in applied.stats), sum(s.total for s in applied.stats),
                               base_ppl, baseline.probes)
        finally:
            applied.undo()
        points.append(point)
        if record is not None:
            record.append(asdict(point))
    if record is not None:
        record.remove()
    return FrontierResult(options=options, baseline=baseline, points=points)


def plot_frontier(result: FrontierResult, path: str | Path) -> Path:
    """Loose and strict held-out recall against nats per token, one line per method, with
    both intervals as error bars."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key in zip(axes, ("loose", "strict")):
        for method in result.options.methods:
            rows = sorted((p for p in result.points if p.method == method), key=lambda p: p.nats["value"])
            x = [p.nats["value"] for p in rows]
            y = [getattr(p, key)["value"] for p in rows]
            xerr = [[v - p.nats["low"] for v, p in zip(x, rows)], [p.nats["high"] - v for v, p in zip(x, rows)]]
            yerr = [[v - getattr(p, key)["low"] for v, p in zip(y, rows)],
                    [getattr(p, key)["high"] - v for v, p in zip(y, rows)]]
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, marker="o", markersize=3, capsize=2, linewidth=1, label=method)
        ax.axhline(getattr(result.baseline, key)["value"], color="gray", linestyle=":", linewidth=1)
        ax.set_xscale("symlog", linthresh=1e-5)  # linear around 0 (edits that cost nothing measurable)
        ax.set_xlim(left=-1e-4)
        ax.set_xlabel("cost: mean loss increase on general text (nats / token)")
        ax.set_title(f"held-out {key} recall")
    axes[0].set_ylabel("recall")
    axes[0].legend(fontsize=8)
    fig.suptitle("Forgetting against cost, per method (lower-left is better)")
    return save_figure(fig, path)
