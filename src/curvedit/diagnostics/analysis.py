"""Activation bands by curvature order: do memorized inputs live in the low-curvature directions?

docs/method.md section 9; the paper's Figures 2 and 4.

For a target `y = W x` with K-FAC factors `A = U_A diag(mu) U_A^T` and `G`, component
`(i, j)` has curvature mass `lam_i * mu_j`, so all the components that eigenvector `v_j`
of A takes part in hold mass `mu_j * sum(lam)`. The K-FAC mass order of the eigenvectors
of A is therefore the order of `mu` (descending), which `Eigenbasis.U_A` already has.
The comparison basis is the right singular vectors of W, by descending singular value
(the full `d_in x d_in` basis: when `d_out < d_in` the null-space vectors, of singular
value 0, come last in the order `torch.linalg.svd` returns them).

Each ordered basis is cut into bands by fractions of its `d_in` vectors, by default top
10%, 10-25%, 25-50% and bottom 50% (band edges `round(f * d_in)`, halves rounded up;
every band must hold at least one vector). The value of a band on a data set is the mean
of `|v^T x|` over the band's vectors and over the data's counted positions, where `x` is
the target's input, captured by a forward hook. Counted positions:

- memorized windows, `positions="suffix"` (default): the positions whose next-token
  prediction is a suffix token, i.e. `P-1 .. P+S-2` of prefix + suffix (where recall
  happens); `positions="all"`: every position of prefix + suffix;
- clean sequences and task-family prompts: every real (non-padding) position.

The report gives per band the memorized value, the clean value and their ratio; the
paper finds the ratio rising toward the bottom band in the K-FAC basis (memorized data
more active in the flat directions) and no such order in the SVD basis.

Task families (Figure 4): the *bottom-band share* of a set of prompts is the bottom band's
part of the total mean activation, `sum_{j in bottom} m_j / sum_j m_j` with
`m_j = mean |v_j^T x|`, averaged over targets; plotted against the accuracy each family
loses after an edit (the drops are given by the caller).
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from curvedit.data import DataError, batched, pad_batch, read_records
from curvedit.errors import CurveditError
from curvedit.evaluate.windows import Window
from curvedit.io import write_json
from curvedit.kfac.spectrum import Eigenbasis
from curvedit.kfac.targets import Target
from curvedit.plots import pyplot, save_figure

DEFAULT_EDGES = (0.1, 0.25, 0.5)
POSITIONS = ("suffix", "all")
BANDS_JSON = "bands.json"
FAMILIES_JSON = "families.json"
FAMILIES_PNG = "families.png"


class AnalysisError(CurveditError):
    """An analysis that cannot be run as asked (bad bands, no data, shapes that differ)."""


@dataclass
class BandOptions:
    """How inputs are collected and bands are cut.

    Attributes:
        edges: band edges as increasing fractions in (0, 1) of the ordered basis; the
            default (0.1, 0.25, 0.5) gives top 10%, 10-25%, 25-50%, bottom 50%.
        positions: counted positions of memorized windows: "suffix" or "all".
        batch_size: sequences per forward pass.
        progress: show progress bars.
    """

    edges: tuple[float, ...] = DEFAULT_EDGES
    positions: str = "suffix"
    batch_size: int = 16
    progress: bool = True

    def validate(self) -> None:
        """Raises: AnalysisError: edges not increasing in (0, 1), a bad positions mode or batch size."""
        edges = list(self.edges)
        if any(not 0 < e < 1 for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
            raise AnalysisError(f"band edges must be increasing fractions in (0, 1), got {self.edges}")
        if self.positions not in POSITIONS:
            raise AnalysisError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.batch_size < 1:
            raise AnalysisError(f"batch_size must be at least 1, got {self.batch_size}")


def band_bounds(n: int, edges: Sequence[float] = DEFAULT_EDGES) -> list[tuple[int, int]]:
    """The index ranges of the bands of an ordered basis of `n` vectors.

    Args:
        n: number of basis vectors.
        edges: increasing fractions in (0, 1).

    Returns:
        `[(start, stop), ...]`, one per band, covering `0 .. n` (edges at
        `floor(f * n + 1/2)`).

    Raises:
        AnalysisError: a band that would hold no vector (n too small for the edges).
    """
    cuts = [0] + [math.floor(e * n + 0.5) for e in edges] + [n]
    bounds = list(zip(cuts[:-1], cuts[1:]))
    if any(stop <= start for start, stop in bounds):
        raise AnalysisError(f"{n} basis vectors are too few for band edges {tuple(edges)}: a band would be empty")
    return bounds


def band_labels(edges: Sequence[float] = DEFAULT_EDGES) -> list[str]:
    """Band names such as "0-10%", "10-25%", "25-50%", "50-100%"."""
    cuts = [0.0] + list(edges) + [1.0]
    return [f"{100 * a:g}-{100 * b:g}%" for a, b in zip(cuts[:-1], cuts[1:])]


def svd_input_basis(weight_oi: torch.Tensor) -> torch.Tensor:
    """The right singular vectors of W as columns, by descending singular value.

    Args:
        weight_oi: `(d_out, d_in)` weight.

    Returns:
        `(d_in, d_in)` float64, orthonormal columns (null-space vectors last).
    """
    _, _, vh = torch.linalg.svd(weight_oi.detach().double(), full_matrices=True)
    return vh.T


@dataclass
class ProbeSet:
    """Token sequences and, per sequence, the range of positions that count.

    Attributes:
        sequences: token-id sequences.
        spans: per sequence, `(start, stop)`: positions `start .. stop-1` count.
    """

    sequences: list[list[int]]
    spans: list[tuple[int, int]]

    @property
    def positions(self) -> int:
        """The number of counted positions."""
        return sum(stop - start for start, stop in self.spans)


def window_probes(windows: Sequence[Window], positions: str = "suffix") -> ProbeSet:
    """Probe memorized windows (prefix + suffix) at the suffix-predicting or all positions.

    Args:
        windows: prefix/suffix windows.
        positions: "suffix" (positions `P-1 .. P+S-2`) or "all".

    Returns:
        The `ProbeSet`.

    Raises:
        AnalysisError: no window or an unknown positions mode.
    """
    if not windows:
        raise AnalysisError("no memorized window to probe")
    if positions not in POSITIONS:
        raise AnalysisError(f"positions must be one of {POSITIONS}, got {positions!r}")
    sequences = [list(w.prefix_ids) + list(w.suffix_ids) for w in windows]
    if positions == "all":
        spans = [(0, len(s)) for s in sequences]
    else:
        spans = [(len(w.prefix_ids) - 1, len(w.prefix_ids) + len(w.suffix_ids) - 1) for w in windows]
    return ProbeSet(sequences, spans)


def sequence_probes(sequences: Sequence[Sequence[int]], what: str = "clean") -> ProbeSet:
    """Probe sequences at every position.

    Raises:
        AnalysisError: no sequence, or an empty one.
    """
    if not sequences or any(len(s) == 0 for s in sequences):
        raise AnalysisError(f"the {what} set is empty or holds an empty sequence")
    return ProbeSet([list(s) for s in sequences], [(0, len(s)) for s in sequences])


@torch.no_grad()
def visit_target_inputs(model: nn.Module, targets: Sequence[Target], probes: ProbeSet,
                        visit: Callable[[Target, torch.Tensor, torch.Tensor, list[int]], None], *,
                        batch_size: int = 16, pad_id: int = 0, progress: bool = False, desc: str = "probe") -> None:
    """Run the probe sequences in right-padded batches (eval mode, no grad) and hand each
    target's input to `visit(target, x_btd, counted_bt, rows)`: `counted_bt` is True at the
    counted positions, `rows` the batch's indices into `probes.sequences`.

    Raises:
        AnalysisError: a target input whose leading shape is not the batch's `(B, T)` (a
            module that does not see one vector per token).
    """
    device = next(model.parameters()).device
    current: dict[str, Any] = {}

    def make_hook(target: Target):
        def hook(_module: nn.Module, inputs: tuple, _output: torch.Tensor) -> None:
            x_btd, counted_bt = inputs[0], current["mask"]
            if tuple(x_btd.shape[:-1]) != tuple(counted_bt.shape):
                raise AnalysisError(f"{target.name}: input has leading shape {tuple(x_btd.shape[:-1])}, "
                                    f"expected the batch's {tuple(counted_bt.shape)}")
            visit(target, x_btd, counted_bt, current["rows"])
        return hook

    handles = [t.module.register_forward_hook(make_hook(t)) for t in targets]
    was_training = model.training
    model.eval()
    try:
        rows = list(range(len(probes.sequences)))
        with tqdm(total=len(rows), unit="seq", desc=desc, disable=not progress) as bar:
            for chunk in batched(rows, batch_size):
                batch = pad_batch([probes.sequences[i] for i in chunk], pad_id)
                index = torch.arange(batch["input_ids"].shape[1])
                current["mask"] = torch.stack([(index >= probes.spans[i][0]) & (index < probes.spans[i][1])
                                               for i in chunk]).to(device)
                current["rows"] = chunk
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
                bar.update(len(chunk))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def mean_abs_projections(model: nn.Module, targets: Sequence[Target], directions: Mapping[str, torch.Tensor],
                         probes: ProbeSet, *, batch_size: int = 16, pad_id: int = 0,
                         progress: bool = False, desc: str = "probe") -> dict[str, torch.Tensor]:
    """Mean `|d^T x|` over counted positions for each direction `d`, per target.

    Args:
        model: the model; it is run with `input_ids` and `attention_mask` (right padded).
        targets: the targets whose inputs `x` are captured (forward hooks).
        directions: target name -> `(d_in, k)` matrix of directions (columns).
        probes: the sequences and their counted positions.
        batch_size: sequences per forward pass.
        pad_id: padding id.
        progress: show a progress bar.
        desc: the progress bar's label.

    Returns:
        Target name -> float64 `(k,)` means.

    Raises:
        AnalysisError: no counted position, or a target input whose leading shape is not
            the batch's `(B, T)` (a module that does not see one vector per token).
    """
    if probes.positions == 0:
        raise AnalysisError("no counted position in the probe set")
    device = next(model.parameters()).device
    sums = {t.name: torch.zeros(directions[t.name].shape[1], dtype=torch.float64, device=device) for t in targets}
    dirs = {name: d.to(device=device, dtype=torch.float64) for name, d in directions.items()}

    def visit(target: Target, x_btd: torch.Tensor, counted_bt: torch.Tensor, _rows: list[int]) -> None:
        sums[target.name] += (x_btd[counted_bt].double() @ dirs[target.name]).abs().sum(dim=0)

    visit_target_inputs(model, targets, probes, visit, batch_size=batch_size, pad_id=pad_id, progress=progress,
                        desc=desc)
    return {name: (total / probes.positions).cpu() for name, total in sums.items()}


@dataclass
class BandStats:
    """One band of one basis of one target.

    Attributes:
        band: its label, e.g. "0-10%" (top of the order) or "50-100%" (bottom).
        start: first vector index of the band.
        stop: one past its last vector index.
        memorized: mean `|v^T x|` over the band's vectors and the memorized positions.
        clean: the same on clean positions.
        ratio: memorized / clean (inf when clean is 0).
    """

    band: str
    start: int
    stop: int
    memorized: float
    clean: float
    ratio: float


@dataclass
class TargetBands:
    """The band comparison of one target in both bases.

    Attributes:
        name: target name.
        layer: its block index (or None).
        kfac: bands of the eigenvectors of A in K-FAC mass order.
        svd: bands of the right singular vectors of W by singular value.
    """

    name: str
    layer: int | None
    kfac: list[BandStats]
    svd: list[BandStats]


def _bands(mem: torch.Tensor, clean: torch.Tensor, bounds: list[tuple[int, int]], labels: list[str]) -> list[BandStats]:
    rows = []
    for (start, stop), label in zip(bounds, labels):
        m, c = float(mem[start:stop].mean()), float(clean[start:stop].mean())
        rows.append(BandStats(band=label, start=start, stop=stop, memorized=m, clean=c,
                              ratio=m / c if c > 0 else math.inf))
    return rows


@dataclass
class BandAnalysis:
    """Band comparison of memorized vs clean inputs for a set of targets.

    Attributes:
        options: the options used.
        targets: per target, bands in both bases.
        memorized_positions: counted memorized positions.
        clean_positions: counted clean positions.
    """

    options: BandOptions
    targets: list[TargetBands]
    memorized_positions: int
    clean_positions: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (options, position counts, per-target bands)."""
        return asdict(self)

    def write(self, out_dir: str | Path) -> list[Path]:
        """Write `bands.json` and one `bands_layer{L}.png` per layer into `out_dir`.

        Returns:
            The paths written.
        """
        out = Path(out_dir)
        write_json(out / BANDS_JSON, self.to_dict())
        return [out / BANDS_JSON, *plot_bands(self, out)]


def band_analysis(model: nn.Module, targets: Sequence[Target], bases: Mapping[str, Eigenbasis],
                  memorized_windows: Sequence[Window], clean_sequences: Sequence[Sequence[int]],
                  options: BandOptions | None = None, *, pad_id: int = 0) -> BandAnalysis:
    """Mean `|v^T x|` per band, memorized vs clean, in the K-FAC and the SVD basis.

    Args:
        model: the (unedited) model the factors come from.
        targets: the targets to analyse (each needs an eigenbasis).
        bases: target name -> `Eigenbasis` (e.g. from `curvedit.kfac.spectrum.load_bases`).
        memorized_windows: windows the model recites.
        clean_sequences: token sequences of ordinary text.
        options: `BandOptions`.
        pad_id: padding id.

    Returns:
        A `BandAnalysis` (call `.write(out_dir)` for JSON + per-layer PNGs).

    Raises:
        AnalysisError: bad options, no data, a target without eigenbasis, too few
            vectors for the bands, or a basis whose size is not the target's `d_in`.
    """
    options = options or BandOptions()
    options.validate()
    if not targets:
        raise AnalysisError("no target to analyse")
    directions = {}
    for target in targets:
        if target.name not in bases:
            raise AnalysisError(f"{target.name}: no eigenbasis (factors) for this target")
        u_a = bases[target.name].U_A
        d_in = target.shape_oi[1]
        if u_a.shape != (d_in, d_in):
            raise AnalysisError(f"{target.name}: eigenbasis of A is {tuple(u_a.shape)}, the weight has d_in={d_in}")
        band_bounds(d_in, options.edges)
        directions[target.name] = torch.cat([u_a.double().cpu(), svd_input_basis(target.weight_oi().cpu())], dim=1)
    mem_probes = window_probes(memorized_windows, options.positions)
    clean_probes = sequence_probes(clean_sequences)
    common = {"batch_size": options.batch_size, "pad_id": pad_id, "progress": options.progress}
    mem = mean_abs_projections(model, targets, directions, mem_probes, desc="memorized", **common)
    clean = mean_abs_projections(model, targets, directions, clean_probes, desc="clean", **common)
    labels = band_labels(options.edges)
    results = []
    for target in targets:
        d_in = target.shape_oi[1]
        bounds = band_bounds(d_in, options.edges)
        m, c = mem[target.name], clean[target.name]
        results.append(TargetBands(name=target.name, layer=target.layer,
                                   kfac=_bands(m[:d_in], c[:d_in], bounds, labels),
                                   svd=_bands(m[d_in:], c[d_in:], bounds, labels)))
    return BandAnalysis(options=options, targets=results, memorized_positions=mem_probes.positions,
                        clean_positions=clean_probes.positions)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def plot_bands(analysis: BandAnalysis, out_dir: str | Path) -> list[Path]:
    """Figure-2-style plots, one PNG per layer: a row per target, a column per basis
    (K-FAC, SVD), grouped bars per band (memorized vs clean), the ratio above each group.

    Returns:
        The PNG paths (`bands_layer{L}.png`; `bands_{target}.png` for targets without layer).
    """
    plt = pyplot()
    groups: dict[str, list[TargetBands]] = defaultdict(list)
    for target in analysis.targets:
        groups[f"layer{target.layer}" if target.layer is not None else _safe(target.name)].append(target)
    paths = []
    for key, rows in groups.items():
        fig, axes = plt.subplots(len(rows), 2, figsize=(10, 3.2 * len(rows)), squeeze=False)
        for row, target in zip(axes, rows):
            for ax, (basis, bands) in zip(row, (("K-FAC eigenbasis of A (mass order)", target.kfac),
                                                ("SVD of W (singular-value order)", target.svd))):
                x = torch.arange(len(bands)).numpy()
                mem = [b.memorized for b in bands]
                clean = [b.clean for b in bands]
                ax.bar(x - 0.2, mem, 0.4, label="memorized", color="tab:red")
                ax.bar(x + 0.2, clean, 0.4, label="clean", color="tab:blue")
                top = max(mem + clean) or 1.0
                for i, band in enumerate(bands):
                    ax.text(i, max(band.memorized, band.clean) + 0.03 * top, f"x{band.ratio:.2f}", ha="center",
                            fontsize=8)
                ax.set_xticks(x, [b.band for b in bands])
                ax.set_ylim(0, 1.35 * top)
                ax.set_ylabel("mean |v^T x|")
                ax.set_title(f"{target.name}\n{basis}", fontsize=8)
                ax.legend(fontsize=7, loc="upper center", ncol=2, frameon=False)
        fig.suptitle("memorized vs clean activation per band (top of the order on the left)", fontsize=10)
        fig.tight_layout()
        paths.append(save_figure(fig, Path(out_dir) / f"bands_{key}.png"))
    return paths


@dataclass
class FamilyShare:
    """How much of a task family's activation falls in the bottom K-FAC band.

    Attributes:
        family: the family name.
        bottom_share: mean over targets of the bottom band's share of the total mean
            activation `sum_j mean|v_j^T x|`.
        per_target: target name -> its bottom-band share.
        positions: counted positions (every real token of every prompt).
        accuracy_drop: the accuracy the family lost after the edit, when given.
    """

    family: str
    bottom_share: float
    per_target: dict[str, float] = field(default_factory=dict)
    positions: int = 0
    accuracy_drop: float | None = None


def task_family_shares(model: nn.Module, targets: Sequence[Target], bases: Mapping[str, Eigenbasis],
                       families: Mapping[str, Sequence[Sequence[int]]],
                       accuracy_drops: Mapping[str, float] | None = None, options: BandOptions | None = None, *,
                       pad_id: int = 0) -> list[FamilyShare]:
    """Bottom-band activation share per task family (the x axis of the paper's Figure 4).

    Args:
        model: the unedited model.
        targets: the targets (each needs an eigenbasis).
        bases: target name -> `Eigenbasis`.
        families: family name -> its prompts / sequences (token ids; every real position
            counts).
        accuracy_drops: family name -> accuracy lost after the edit (e.g. unedited minus
            edited accuracy); families without an entry get None.
        options: `BandOptions` (its edges define the bottom band).
        pad_id: padding id.

    Returns:
        One `FamilyShare` per family, in the order given.

    Raises:
        AnalysisError: no family, an empty family, a target without eigenbasis, or a
            drop given for a family that does not exist.
    """
    options = options or BandOptions()
    options.validate()
    if not families:
        raise AnalysisError("no task family given")
    drops = dict(accuracy_drops or {})
    unknown = sorted(set(drops) - set(families))
    if unknown:
        raise AnalysisError(f"accuracy drops given for unknown families {unknown}; families: {sorted(families)}")
    missing = [t.name for t in targets if t.name not in bases]
    if missing or not targets:
        raise AnalysisError(f"no eigenbasis (factors) for targets {missing}" if missing else "no target to analyse")
    directions = {t.name: bases[t.name].U_A.double().cpu() for t in targets}
    results = []
    for family, sequences in families.items():
        probes = sequence_probes(sequences, what=f"task family {family!r}")
        means = mean_abs_projections(model, targets, directions, probes, batch_size=options.batch_size,
                                     pad_id=pad_id, progress=options.progress, desc=family)
        per_target = {}
        for target in targets:
            start, stop = band_bounds(target.shape_oi[1], options.edges)[-1]
            m = means[target.name]
            total = float(m.sum())
            per_target[target.name] = float(m[start:stop].sum()) / total if total > 0 else 0.0
        results.append(FamilyShare(family=family, bottom_share=sum(per_target.values()) / len(per_target),
                                   per_target=per_target, positions=probes.positions,
                                   accuracy_drop=drops.get(family)))
    return results


def plot_task_families(shares: Sequence[FamilyShare], out: str | Path) -> Path:
    """Scatter of bottom-band share (x) vs accuracy drop (y), one labelled point per family
    that has a drop; Pearson's r in the title when three or more families have one.

    Returns:
        The PNG path.

    Raises:
        AnalysisError: no family has an accuracy drop.
    """
    points = [s for s in shares if s.accuracy_drop is not None]
    if not points:
        raise AnalysisError("no family has an accuracy drop to plot against")
    plt = pyplot()
    x = torch.tensor([s.bottom_share for s in points], dtype=torch.float64)
    y = torch.tensor([s.accuracy_drop for s in points], dtype=torch.float64)
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    ax.scatter(x.numpy(), y.numpy(), color="tab:purple", zorder=3)
    for share, xi, yi in zip(points, x.tolist(), y.tolist()):
        ax.annotate(share.family, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    title = "task families: bottom-band activation vs accuracy drop"
    if len(points) >= 3 and float(x.std()) > 0 and float(y.std()) > 0:
        r = float(torch.corrcoef(torch.stack([x, y]))[0, 1])
        title += f" (r = {r:.2f})"
    ax.set_title(title, fontsize=9)
    ax.margins(0.15)
    ax.set_xlabel("share of mean |v^T x| in the bottom K-FAC band")
    ax.set_ylabel("accuracy drop after the edit")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out)


def write_task_families(shares: Sequence[FamilyShare], out_dir: str | Path) -> list[Path]:
    """Write `families.json` and, when some family has an accuracy drop, `families.png`.

    Returns:
        The paths written.
    """
    out = Path(out_dir)
    write_json(out / FAMILIES_JSON, [asdict(s) for s in shares])
    paths = [out / FAMILIES_JSON]
    if any(s.accuracy_drop is not None for s in shares):
        paths.append(plot_task_families(shares, out / FAMILIES_PNG))
    return paths


def read_prompts(path: str | Path, tokenizer: Any | None, *, text_field: str = "text") -> list[list[int]]:
    """Read prompts, one per JSONL row (text tokenized without special tokens, or `input_ids`);
    rows are never packed together.

    Raises:
        DataError: a malformed row, a text row without tokenizer, or a file without rows.
    """
    prompts = []
    for record in read_records(path, text_field=text_field):
        if record.input_ids is not None:
            prompts.append(record.input_ids)
        elif tokenizer is None:
            raise DataError(f"{record.source}: text rows need a tokenizer (the model has none; give input_ids)")
        else:
            prompts.append(tokenizer(record.text, add_special_tokens=False)["input_ids"])
    prompts = [p for p in prompts if p]
    if not prompts:
        raise DataError(f"{path}: no prompt in the file")
    return prompts


def read_drops(path: str | Path) -> dict[str, float]:
    """Read accuracy drops: a JSON object `{family: drop}`.

    Raises:
        DataError: not a JSON object of numbers.
    """
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not all(isinstance(v, (int, float)) for v in data.values()):
        raise DataError(f"{path}: expected a JSON object {{family: accuracy drop}}")
    return {str(k): float(v) for k, v in data.items()}
