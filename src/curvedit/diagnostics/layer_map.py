"""Where to cut: the forgetting an edit buys per unit of cost, block by block (`curvedit layer-map`).

The same small edit (one amount, one matrix selection) is applied to every single block and
to every run of three consecutive blocks, each alone, through the sweep (`run_sweep`: edit,
measure, undo). For each placement:

- forgetting = the drop in loose recall of the memorized windows (the tune half), unedited
  minus edited;
- cost = the perplexity rise on held-out text (edited / unedited - 1) and, with probes, the
  mean accuracy lost over the families the unedited model gets above chance (points);
- efficiency = forgetting / perplexity rise (and forgetting / probe points lost), each
  denominator floored at `floor` so a free edit does not divide by zero;
- selectivity = the rise of the memorized windows' suffix loss (teacher-forced, nats per
  token) over the rise of the general text's loss (nats per token): continuous where recall
  is all-or-nothing, so it still ranks placements whose small edit recites every window.

A placement that forgets much for little perplexity is where an edit should go; whether the
map also predicts which placements keep the probe families is read off the same table.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from curvedit.editing.sweep import SweepGrid, SweepOptions, matrices_spec, run_sweep
from curvedit.errors import CurveditError
from curvedit.evaluate.tasks import Task
from curvedit.evaluate.windows import Window
from curvedit.io import write_json
from curvedit.kfac.targets import select_targets
from curvedit.plots import pyplot, save_figure

LAYER_MAP_JSON, LAYER_MAP_PNG = "layer_map.json", "layer_map.png"
LAYER_MAP_JOURNAL = "layer_map.journal.jsonl"  # the finished placements of an unfinished map


class LayerMapError(CurveditError):
    """A layer map that cannot be drawn as asked."""


@dataclass(frozen=True)
class LayerMapOptions:
    """What the map applies and measures.

    Attributes:
        matrices: the matrix selection edited in each placement (a preset or a pattern).
        keep_fraction: the fixed, small edit: the share of components kept.
        group_sizes: placements of this many consecutive blocks (1: every single block).
        floor: the smallest cost a ratio divides by (perplexity rise, or probe points / 100).
        batch_size: sequences per forward pass.
        progress: show a progress bar.
    """

    matrices: str = "mlp-in"
    keep_fraction: float = 0.9
    group_sizes: tuple[int, ...] = (1, 3)
    floor: float = 1e-3
    batch_size: int = 16
    progress: bool = True

    def validate(self) -> None:
        """Raises: LayerMapError: an amount outside (0, 1), a group size below 1, a floor <= 0."""
        if not 0 < self.keep_fraction < 1:
            raise LayerMapError(f"the keep fraction must be in (0, 1) (1 edits nothing), got {self.keep_fraction}")
        if not self.group_sizes or min(self.group_sizes) < 1:
            raise LayerMapError(f"group sizes must be >= 1, got {list(self.group_sizes)}")
        if not self.floor > 0:
            raise LayerMapError(f"the floor must be positive, got {self.floor}")


@dataclass
class Placement:
    """One placement's measurements.

    Attributes:
        layers: the blocks edited ("13-15").
        size: how many blocks.
        first: the first block.
        forgetting: loose recall, unedited minus edited.
        ppl_rise: perplexity / unedited - 1.
        probe_points_lost: mean accuracy lost over the usable families, in points (None without probes).
        per_ppl: forgetting / max(ppl_rise, floor).
        per_probe_point: forgetting / max(points lost, 100 * floor) (None without probes).
        suffix_nll_rise: the memorized windows' loss per suffix token, edited minus unedited
            (nats; a continuous forgetting that a small edit moves before recall does).
        loss_rise: the general text's loss per token, edited minus unedited (nats: log of
            the perplexity ratio).
        per_nats: suffix_nll_rise / max(loss_rise, floor): how selectively the placement
            forgets, in nats on the memorized suffixes per nat on general text.
        strict, loose, perplexity: the edited model's values.
        probes: the edited model's probe accuracy per family.
    """

    layers: str
    size: int
    first: int
    forgetting: float
    ppl_rise: float
    probe_points_lost: float | None
    per_ppl: float
    per_probe_point: float | None
    suffix_nll_rise: float
    loss_rise: float
    per_nats: float
    strict: float
    loose: float
    perplexity: float
    probes: dict[str, float] = field(default_factory=dict)


@dataclass
class LayerMap:
    """The map: the unedited model's values and every placement.

    Attributes:
        options: what was applied.
        unedited: loose, strict, perplexity and probes of the unedited model.
        usable_probes: the families the probe cost averages over.
        placements: in order of size, then first block.
        n_layers: the model's numbered blocks.
    """

    options: LayerMapOptions
    unedited: dict[str, Any]
    usable_probes: list[str]
    placements: list[Placement]
    n_layers: int

    @property
    def mark(self) -> str:
        """The paper's kind of placement on this model (`middle_three`)."""
        return middle_three(self.n_layers)

    def best(self, size: int, by: str = "per_ppl") -> Placement | None:
        """The placement of `size` blocks with the highest efficiency `by`."""
        rows = [p for p in self.placements if p.size == size and getattr(p, by) is not None]
        return max(rows, key=lambda p: getattr(p, by)) if rows else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the paper's kind of placement as `mark`."""
        return {"options": asdict(self.options), "unedited": self.unedited, "usable_probes": self.usable_probes,
                "placements": [asdict(p) for p in self.placements], "n_layers": self.n_layers, "mark": self.mark}

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write `layer_map.json` and `layer_map.png` (the paper's kind of placement ringed).

        Returns:
            (JSON path, PNG path).
        """
        out = Path(out_dir)
        write_json(out / LAYER_MAP_JSON, self.to_dict())
        return out / LAYER_MAP_JSON, plot_layer_map(self, out / LAYER_MAP_PNG)


def middle_three(n_layers: int) -> str:
    """The paper's kind of placement: three blocks around the middle ("13-15" of 30)."""
    if n_layers <= 3:
        return "0" if n_layers == 1 else f"0-{n_layers - 1}"
    first = (n_layers - 3) // 2
    return f"{first}-{first + 2}"


def placements_of(n_layers: int, sizes: Sequence[int]) -> list[str]:
    """Every run of `size` consecutive blocks among `n_layers`, for each size ("3", "0-2", ...)."""
    groups = []
    for size in sizes:
        for first in range(0, n_layers - size + 1):
            groups.append(str(first) if size == 1 else f"{first}-{first + size - 1}")
    return groups


def layer_map(model: nn.Module, tokenizer: Any, factor_dir: str | Path, windows: Sequence[Window],
              heldout: Sequence[Sequence[int]], options: LayerMapOptions | None = None,
              tasks: Sequence[Task] = (), journal: str | Path | None = None) -> LayerMap:
    """Apply the same small edit at every placement, alone, and measure what it buys and costs.

    Args:
        model: the unedited causal LM (the factors' model).
        tokenizer: its tokenizer (probes and padding).
        factor_dir: factors covering the matrices of every block.
        windows: memorized windows (the tune half).
        heldout: held-out sequences for perplexity.
        options: `LayerMapOptions`.
        tasks: probe tasks (the capability suite); optional.
        journal: a file each finished placement is recorded in, so a rerun resumes
            (`curvedit.editing.sweep.run_sweep`'s journal); removed on return.

    Returns:
        The `LayerMap` (the model is left as it was).

    Raises:
        LayerMapError: bad options, or matrices that select no block-indexed target.
        curvedit.editing.sweep.SweepError, curvedit.kfac.factors.FactorError: as `run_sweep`.
    """
    options = options or LayerMapOptions()
    options.validate()
    layers = sorted({t.layer for t in select_targets(model, matrices_spec(options.matrices, None))
                     if t.layer is not None})
    if not layers:
        raise LayerMapError(f"matrices {options.matrices!r} select no target inside a numbered block")
    n_layers = layers[-1] + 1
    groups = placements_of(n_layers, [s for s in options.group_sizes if s <= n_layers])
    grid = SweepGrid(layers=tuple(groups), matrices=(options.matrices,), keep_fraction=(options.keep_fraction,))
    swept = run_sweep(model, tokenizer, factor_dir, grid, windows, heldout,
                      SweepOptions(ppl_budget=None, batch_size=options.batch_size, progress=options.progress),
                      tasks=tasks, journal=journal)
    base, usable = swept.baseline, swept.usable_probes
    rows = []
    for point in swept.points:
        span = [int(x) for x in point.layers.split("-")]
        forgetting = base.loose - point.loose
        rise = point.perplexity / base.perplexity - 1
        held, loss = point.suffix_nll - base.suffix_nll, math.log(point.perplexity / base.perplexity)
        lost = (100 * sum(base.probes[f] - point.probes[f] for f in usable) / len(usable)) if usable else None
        rows.append(Placement(
            layers=point.layers, size=span[-1] - span[0] + 1, first=span[0], forgetting=forgetting, ppl_rise=rise,
            probe_points_lost=lost, per_ppl=forgetting / max(rise, options.floor),
            per_probe_point=None if lost is None else forgetting / max(lost, 100 * options.floor),
            suffix_nll_rise=held, loss_rise=loss, per_nats=held / max(loss, options.floor),
            strict=point.strict, loose=point.loose, perplexity=point.perplexity, probes=dict(point.probes)))
    unedited = {"loose": base.loose, "strict": base.strict, "perplexity": base.perplexity, "probes": base.probes,
                "suffix_nll": base.suffix_nll}
    return LayerMap(options=options, unedited=unedited, usable_probes=list(usable), placements=rows,
                    n_layers=n_layers)


def plot_layer_map(result: LayerMap, path: str | Path) -> Path:
    """Forgetting per unit of perplexity rise against the first block, one line per group size;
    beside it the suffix-loss selectivity (`per_nats`), and with probes a panel per probe point lost."""
    plt = pyplot()
    panels = [("per_ppl", "loose recall drop / perplexity rise"),
              ("per_nats", "memorized suffix loss rise / general loss rise")]
    if result.usable_probes:
        panels.append(("per_probe_point", "loose recall drop / probe point lost"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 3.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for size in sorted({p.size for p in result.placements}):
            rows = [p for p in result.placements if p.size == size]
            ax.plot([p.first + (p.size - 1) / 2 for p in rows], [getattr(p, key) for p in rows], marker="o",
                    markersize=3, label=f"{size} block{'s' if size > 1 else ''}")
        mark = result.mark
        chosen = next((p for p in result.placements if p.layers == mark), None)
        if chosen is not None:
            ax.scatter([chosen.first + (chosen.size - 1) / 2], [getattr(chosen, key)], s=120, facecolors="none",
                       edgecolors="red", linewidths=2, label=f"blocks {mark}", zorder=5)
        ax.set_xlabel("block (centre of the placement)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(f"Where to cut: {result.options.matrices}, keep {result.options.keep_fraction:g} per placement")
    return save_figure(fig, path)
