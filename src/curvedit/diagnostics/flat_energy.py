"""Where a text's activations sit in the curvature spectrum: the flat-energy share (`curvedit score`).

For a target with input factor `A = U_A diag(mu) U_A^T` (eigenvalues descending), the flat
directions are the last `flat_fraction` of its eigenvectors, the input directions the general
data barely uses. A sequence's flat-energy share at that target is

    sum_t ||U_flat^T x_t||^2 / sum_t ||x_t||^2

over its counted positions (every real token, or the suffix-predicting ones of a memorized
window), and its score is the mean over targets. Recited text is reported to put more of its
energy there than ordinary text (a label-free memorization score needing one forward pass);
the study also uses it to ask where a canary style's energy sits against general text.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from curvedit.diagnostics.analysis import ProbeSet, visit_target_inputs
from curvedit.errors import CurveditError
from curvedit.evaluate.privacy import stratified_auroc_interval
from curvedit.kfac.spectrum import Eigenbasis
from curvedit.kfac.targets import Target


class FlatEnergyError(CurveditError):
    """A flat-energy request that cannot be computed (bad fraction, no sequence, ...)."""


def flat_directions(basis: Eigenbasis, flat_fraction: float) -> torch.Tensor:
    """The last `flat_fraction` of A's eigenvectors (lowest `mu`), `(d_in, k)`, k >= 1.

    Raises:
        FlatEnergyError: a fraction outside (0, 1).
    """
    if not 0 < flat_fraction < 1:
        raise FlatEnergyError(f"the flat fraction must be in (0, 1), got {flat_fraction}")
    d_in = basis.U_A.shape[1]
    k = max(1, round(flat_fraction * d_in))
    return basis.U_A[:, d_in - k:]


@torch.no_grad()
def flat_energy_shares(model: nn.Module, targets: Sequence[Target], bases: Mapping[str, Eigenbasis],
                       sequences: Sequence[Sequence[int]], *, flat_fraction: float = 0.5,
                       spans: Sequence[tuple[int, int]] | None = None, batch_size: int = 16,
                       pad_id: int = 0) -> list[float]:
    """Each sequence's flat-energy share, averaged over the targets.

    Args:
        model: the model the factors come from (run with `input_ids` and `attention_mask`).
        targets: the targets whose inputs are read (forward hooks); each needs an eigenbasis.
        bases: target name -> `Eigenbasis`.
        sequences: token-id sequences.
        flat_fraction: the share of A's eigenvectors, from the flattest, that counts as flat.
        spans: per sequence, `(start, stop)` of the counted positions (default: all).
        batch_size: sequences per forward pass.
        pad_id: padding id.

    Returns:
        One share in [0, 1] per sequence, in order.

    Raises:
        FlatEnergyError: no sequence, an empty span, a target without an eigenbasis, or a
            fraction outside (0, 1).
    """
    if not sequences:
        raise FlatEnergyError("no sequence to score")
    spans = list(spans) if spans is not None else [(0, len(s)) for s in sequences]
    if len(spans) != len(sequences) or any(stop <= start for start, stop in spans):
        raise FlatEnergyError("a sequence with no counted position (or not one span per sequence)")
    if any(start < 0 or stop > len(seq) for (start, stop), seq in zip(spans, sequences)):
        raise FlatEnergyError("a span reaches outside its sequence")
    missing = [t.name for t in targets if t.name not in bases]
    if missing:
        raise FlatEnergyError(f"no eigenbasis for {missing[:3]}")
    device = next(model.parameters()).device
    flat = {t.name: flat_directions(bases[t.name], flat_fraction).to(device=device, dtype=torch.float64)
            for t in targets}
    shares = torch.zeros(len(sequences), dtype=torch.float64)

    def visit(target: Target, x_btd: torch.Tensor, counted_bt: torch.Tensor, rows: list[int]) -> None:
        x_btd, counted = x_btd.double(), counted_bt.double()
        flat_bt = ((x_btd @ flat[target.name]) ** 2).sum(-1)
        total_bt = (x_btd ** 2).sum(-1)
        shares[rows] += ((flat_bt * counted).sum(1) / (total_bt * counted).sum(1).clamp(min=1e-300)).cpu()

    visit_target_inputs(model, targets, ProbeSet([list(s) for s in sequences], spans), visit, batch_size=batch_size,
                        pad_id=pad_id)
    return (shares / len(targets)).tolist()


def flat_energy_by_group(model: nn.Module, targets: Sequence[Target], bases: Mapping[str, Eigenbasis],
                         sequences: Sequence[Sequence[int]], groups: Sequence[str], **kwargs: Any
                         ) -> dict[str, list[float]]:
    """`flat_energy_shares` of `sequences` in one pass, split by each sequence's group.

    Args:
        model: as `flat_energy_shares`.
        targets: as `flat_energy_shares`.
        bases: as `flat_energy_shares`.
        sequences: token-id sequences, read in this order.
        groups: each sequence's group name.
        **kwargs: `flat_fraction`, `batch_size`, `pad_id` of `flat_energy_shares`.

    Returns:
        Group -> its sequences' shares in order, groups in order of first appearance.

    Raises:
        FlatEnergyError: not one group per sequence, or as `flat_energy_shares`.
    """
    if len(groups) != len(sequences):
        raise FlatEnergyError(f"{len(groups)} group names for {len(sequences)} sequences")
    out: dict[str, list[float]] = {}
    for group, share in zip(groups, flat_energy_shares(model, targets, bases, sequences, **kwargs)):
        out.setdefault(group, []).append(share)
    return out


def screen_savings(member_scores: Sequence[float], nonmember_scores: Sequence[float], recall: float = 0.99) -> float:
    """What a screen by this score would skip: with the threshold that keeps `recall` of the
    members (the `1 - recall` quantile of their scores, lower interpolation), the share of
    non-members scoring below it.

    Raises:
        FlatEnergyError: an empty group, or a recall outside (0, 1].
    """
    if not member_scores or not nonmember_scores:
        raise FlatEnergyError("a screen needs member and non-member scores")
    if not 0 < recall <= 1:
        raise FlatEnergyError(f"the recall must be in (0, 1], got {recall}")
    threshold = float(torch.quantile(torch.tensor(member_scores, dtype=torch.float64), 1 - recall,
                                     interpolation="lower"))
    return sum(s < threshold for s in nonmember_scores) / len(nonmember_scores)


def score_separation(strata: Sequence[tuple[Sequence[float], Sequence[float]]], recall: float = 0.99
                     ) -> dict[str, Any]:
    """How well a score tells members from non-members, over one or more strata (e.g. seeds).

    Args:
        strata: per stratum, (member scores, non-member scores); higher = more member-like.
        recall: the share of members a screen keeps.

    Returns:
        "auroc": the AUROC with its stratified bootstrap 95% interval (members are compared only
        with non-members of their own stratum; `Interval.to_dict`); "skipped_at_99_recall" (named
        for the default recall): the mean over strata of `screen_savings`.

    Raises:
        FlatEnergyError: no stratum, or a stratum with an empty group.
    """
    if not strata or any(not m or not n for m, n in strata):
        raise FlatEnergyError("a separation needs member and non-member scores in every stratum")
    interval = stratified_auroc_interval([(np.asarray(m, dtype=float), np.asarray(n, dtype=float))
                                          for m, n in strata])
    skipped = [screen_savings(m, n, recall) for m, n in strata]
    return {"auroc": interval.to_dict(), "skipped_at_99_recall": sum(skipped) / len(skipped)}
