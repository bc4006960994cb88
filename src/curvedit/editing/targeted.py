"""A targeted edit for when a forget set exists (`edit --forget mem.jsonl`).

The paper's edit needs no list of memorized text; BalancedSubnet needs one and ignores the
curvature. With a forget set, both can be used: measure the forget set's own mass of every
component in the general data's eigenbasis,

    s^F_ij = mean over the forget windows' suffix-predicting positions of (u_i^T g)^2 (v_j^T x)^2,

with gold labels (the suffix tokens: the loss of reciting them), by the same pass as
`collect --eigencorrect` (`curvedit.kfac.eigencorrect.collect_eigencorrections`), and remove the
components where the forget set's mass is largest relative to the general data's mass
`s_ij` (the EK-FAC masses when the factors hold them, else `lam_i * mu_j`):
ratio `r_ij = s^F_ij / s_ij`. A rule's `keep_fraction` keeps that share of the components
(the lowest ratios), its `rho` keeps that share of the general mass (the highest-ratio
components are removed while the general mass they hold stays within `1 - rho`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from curvedit.data import pad_batch
from curvedit.errors import CurveditError
from curvedit.evaluate.windows import Window
from curvedit.kfac.collect import CollectOptions
from curvedit.kfac.eigencorrect import collect_eigencorrections
from curvedit.kfac.objectives import ObjectiveOutput, summed_nll
from curvedit.kfac.spectrum import Eigenbasis, SelectionError
from curvedit.kfac.targets import Target


class TargetedError(CurveditError):
    """A targeted edit that cannot be made (an empty forget set, masses missing)."""


def forget_batches(windows: Sequence[Window], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded prefix + suffix batches, with `suffix_mask` marking the positions whose
    next token is a suffix token."""
    if not windows:
        raise TargetedError("the forget set holds no window")
    batches = []
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        batch = pad_batch([w.prefix_ids + w.suffix_ids for w in chunk], pad_id, padding_side="right")
        mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        for row, w in enumerate(chunk):
            mask[row, len(w.prefix_ids) - 1: len(w.prefix_ids) + len(w.suffix_ids) - 1] = True
        batch["suffix_mask"] = mask
        batches.append(batch)
    return batches


@dataclass
class SuffixObjective:
    """The loss of reciting each window's suffix (gold labels), counted at the positions that
    predict suffix tokens only."""

    def __call__(self, model: nn.Module, batch: dict, generator: torch.Generator) -> ObjectiveOutput:
        """Per-position logits and the suffix mask of a batch of memorized windows."""
        ids_bt, attn_bt, counted_bt = batch["input_ids"], batch["attention_mask"], batch["suffix_mask"]
        logits_btv = model(input_ids=ids_bt, attention_mask=attn_bt, use_cache=False).logits
        gold_bt = torch.roll(ids_bt, shifts=-1, dims=1)
        loss = summed_nll(logits_btv[counted_bt], gold_bt[counted_bt], "gold", generator)
        return ObjectiveOutput(loss=loss, positions_mask=counted_bt)


def forget_masses(model: nn.Module, windows: Sequence[Window], targets: list[Target], bases: dict[str, Eigenbasis],
                  *, pad_id: int = 0, batch_size: int = 16, progress: bool = False) -> dict[str, torch.Tensor]:
    """`s^F` of every target (module docstring), float64 on CPU."""
    options = CollectOptions(label_mode="gold", accumulate_dtype="float64", progress=progress)
    corrected = collect_eigencorrections(model, forget_batches(windows, batch_size, pad_id), targets, bases,
                                         SuffixObjective(), options)
    return {name: s_oi for name, (s_oi, _) in corrected.items()}


def general_masses(basis: Eigenbasis) -> torch.Tensor:
    """The general data's mass of every component: EK-FAC's `S` when present, else `lam_i * mu_j`."""
    return basis.S if basis.S is not None else torch.outer(basis.lam, basis.mu)


def targeted_mask(forget_oi: torch.Tensor, general_oi: torch.Tensor, rho: float | None = None,
                  keep_fraction: float | None = None) -> torch.Tensor:
    """Keep everything but the components of highest forget / general mass ratio.

    Args:
        forget_oi: `(m, n)` forget-set masses.
        general_oi: `(m, n)` general masses (non-negative).
        rho: share of the general mass to keep (remove the highest ratios while the removed
            general mass is at most `1 - rho` of the total).
        keep_fraction: share of the components to keep.

    Returns:
        `(m, n)` bool mask of kept components.

    Raises:
        SelectionError: both or neither amount, or an amount outside (0, 1].
    """
    if (rho is None) == (keep_fraction is None):
        raise SelectionError("give exactly one of rho and keep_fraction")
    amount = rho if rho is not None else keep_fraction
    if not 0 < amount <= 1:
        raise SelectionError(f"{'rho' if rho is not None else 'keep fraction'} must be in (0, 1], got {amount}")
    general = general_oi.double().flatten().clamp_min(0)
    ratio = forget_oi.double().flatten() / (general + general.max() * 1e-12 + torch.finfo(torch.float64).tiny)
    order = torch.sort(ratio, descending=True, stable=True).indices
    if rho is not None:
        removable = (1 - rho) * float(general.sum())
        removed = int(torch.searchsorted(general[order].cumsum(0), removable, right=True))
    else:
        removed = general.numel() - round(keep_fraction * general.numel())
    mask = torch.ones(general.numel(), dtype=torch.bool, device=forget_oi.device)
    mask[order[:removed]] = False
    return mask.view(general_oi.shape)


def attach_forget_masses(bases: dict[str, Eigenbasis], masses: dict[str, torch.Tensor]) -> None:
    """Put each target's `s^F` on its eigenbasis (`Eigenbasis.forget`), for `masses="targeted"`.

    Raises:
        TargetedError: a basis without forget-set masses.
    """
    missing = [name for name in bases if name not in masses]
    if missing:
        raise TargetedError(f"no forget-set masses for {missing[:3]}")
    for name, basis in bases.items():
        basis.forget = masses[name].to(basis.lam)
