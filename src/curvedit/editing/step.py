"""A coherent step from a forget set (`edit --step-from tune.jsonl`).

Deleting the flat components of a weight removes memorized text in bulk; a follow-up to the
paper found that one step along the direction a memorized set shares removes more for less.
curvedit builds that step from the K-FAC eigenbasis:

1. the forget set's gradient: `g = d/dW sum over the windows' suffix-predicting positions of
   -log p(suffix token)` (gold labels, the same loss as `curvedit.editing.targeted`), per target;
2. its coefficients in the eigenbasis `C = U_G^T g U_A`, restricted to the flat block: the
   components the curvature selection at the block's rule does not keep (exactly what K-FAC's
   edit at that rule deletes), `S = C * ~M`, and back: `D = U_G S U_A^T`;
3. one step of Frobenius norm `norm` over all targets together, up the forget loss:
   `W <- W + norm * D / ||D||`, with `||D||^2` summed over the targets (one coherent step,
   not one per matrix).

General text has little curvature in the flat block, so a step there costs it little; a step
along what the forget set shares can remove held-out windows of the same kind that it never saw.
The natural scale of the norm is the deletion's: the Frobenius norm of `W` in the same block
(`StepDirections.deletion_norm`); `step_within_budget` bisects the norm on (0, that] to a
perplexity budget. Only the suffix loss is implemented as the objective (not a margin).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import nn

from curvedit.editing.budget import Bisection, bisect_edit
from curvedit.editing.edit import AppliedEdit, EditPlan, EditRule, TargetEditStats, kept_mass, kfac_mask
from curvedit.editing.settings import EditSettings
from curvedit.editing.targeted import SuffixObjective, forget_batches
from curvedit.errors import CurveditError
from curvedit.evaluate.perplexity import perplexity
from curvedit.evaluate.windows import Window
from curvedit.kfac.spectrum import Eigenbasis
from curvedit.kfac.targets import Target


class StepError(CurveditError):
    """A coherent step that cannot be built (an empty forget set, a gradient with nothing in the block)."""


@dataclass
class StepDirections:
    """Unit step directions of every target (their Frobenius norms squared sum to 1).

    Attributes:
        block: the rule whose kept set the step avoids (the step lives in the rest).
        directions: target name -> `(d_out, d_in)` float64 direction `D / ||D||`.
        block_sizes: target name -> components in the flat block.
        kept_masses: target name -> share of curvature mass outside the block.
        deletion_norm: the Frobenius norm, over all targets, of the weights in the block
            (what deleting the block would remove).
        gradient_share: `||D|| / ||g||` over all targets: how much of the forget gradient
            lies in the block.
    """

    block: EditRule
    directions: dict[str, torch.Tensor]
    block_sizes: dict[str, int]
    kept_masses: dict[str, float]
    deletion_norm: float
    gradient_share: float


def forget_gradients(model: nn.Module, windows: Sequence[Window], targets: list[Target], *, pad_id: int = 0,
                     batch_size: int = 16) -> dict[str, torch.Tensor]:
    """The forget set's summed suffix loss gradient for every target, `(d_out, d_in)` float64 on CPU.

    Only the targets' weights take gradients (every parameter's `requires_grad` is restored).

    Raises:
        StepError: no window, or a gradient that is not finite.
    """
    if not windows:
        raise StepError("the forget set holds no window")
    params = list(model.parameters())
    wanted = [p.requires_grad for p in params]
    grads = {t.name: None for t in targets}
    objective, generator = SuffixObjective(), torch.Generator()
    try:
        for p in params:
            p.requires_grad_(False)
        for t in targets:
            t.module.weight.requires_grad_(True)
            t.module.weight.grad = None
        device = targets[0].module.weight.device
        for batch in forget_batches(windows, batch_size, pad_id):
            objective(model, {k: v.to(device) for k, v in batch.items()}, generator).loss.backward()
        for t in targets:
            grad = t.module.weight.grad.detach().to("cpu", torch.float64)
            grads[t.name] = grad.T if t.transposed else grad
            t.module.weight.grad = None
    finally:
        for p, flag in zip(params, wanted):
            p.requires_grad_(flag)
    for name, grad in grads.items():
        if not torch.isfinite(grad).all():
            raise StepError(f"{name}: the forget set's gradient is not finite (NaN or inf)")
    return grads


def step_directions(gradients: dict[str, torch.Tensor], targets: list[Target], bases: dict[str, Eigenbasis],
                    block: EditRule) -> StepDirections:
    """The unit coherent step of the forget gradients, inside each target's flat block.

    Args:
        gradients: target name -> `(d_out, d_in)` forget gradient (`forget_gradients`).
        targets: the targets stepped together.
        bases: name -> eigenbasis of the general factors.
        block: a rule (`rho` or `keep_fraction`); the block is what its curvature selection
            does not keep.

    Raises:
        StepError: a target without gradient or eigenbasis, or a gradient with nothing in
            the block (a zero step).
    """
    raw, sizes, masses, deleted_sq, grad_sq = {}, {}, {}, 0.0, 0.0
    for t in targets:
        if t.name not in gradients or t.name not in bases:
            raise StepError(f"{t.name}: no {'gradient' if t.name not in gradients else 'eigenbasis'} for the step")
        basis = bases[t.name].to("cpu", torch.float64)
        mask = kfac_mask(basis, block)
        flat = ~mask
        coeffs = basis.U_G.T @ gradients[t.name] @ basis.U_A
        weight_coeffs = basis.U_G.T @ t.weight_oi().detach().to("cpu", torch.float64) @ basis.U_A
        raw[t.name] = basis.U_G @ (coeffs * flat) @ basis.U_A.T
        sizes[t.name], masses[t.name] = int(flat.sum()), kept_mass(basis, mask)
        deleted_sq += float(torch.sum((weight_coeffs * flat) ** 2))
        grad_sq += float(torch.sum(gradients[t.name] ** 2))
    norm = math.sqrt(sum(float(torch.sum(d ** 2)) for d in raw.values()))
    if not norm > 0:
        raise StepError(f"the forget gradient has nothing in the flat block of {block.rho=} {block.keep_fraction=} "
                        "(keep less, or check the forget windows)")
    return StepDirections(block=block, directions={k: d / norm for k, d in raw.items()}, block_sizes=sizes,
                          kept_masses=masses, deletion_norm=math.sqrt(deleted_sq),
                          gradient_share=norm / math.sqrt(grad_sq))


@torch.no_grad()
def apply_step(targets: list[Target], step: StepDirections, norm: float, settings: EditSettings | None = None
               ) -> AppliedEdit:
    """`W <- W + norm * D` for every target, in place; returns what undoes it bit for bit.

    Args:
        targets: the weights the step moves.
        step: the directions (`step_directions`).
        norm: the step's Frobenius norm over all targets.
        settings: recorded as the returned edit's settings (the eigh precision and device the
            bases were made with); None: the defaults.

    Returns:
        The `AppliedEdit` (`.undo()` restores the weights).

    Raises:
        StepError: a negative or non-finite norm.
    """
    if not (math.isfinite(norm) and norm >= 0):
        raise StepError(f"the step norm must be a finite number >= 0, got {norm}")
    originals, stats = {}, []
    for t in targets:
        weight = t.weight_oi().detach()
        moved = weight.to(torch.float64) + norm * step.directions[t.name].to(weight.device)
        originals[t.name] = t.module.weight.detach().clone()
        if norm > 0:
            t.set_weight_oi(moved)
        total = weight.numel()
        stats.append(TargetEditStats(name=t.name, kept=total - step.block_sizes[t.name], total=total,
                                     mass_kept=step.kept_masses[t.name],
                                     rel_change=norm * float(torch.linalg.norm(step.directions[t.name]))
                                     / max(float(torch.linalg.norm(weight.double())), 1e-30),
                                     rule=asdict(step.block)))
    return AppliedEdit(plan=EditPlan([step.block], settings or EditSettings()), stats=stats, originals=originals,
                       targets=list(targets))


def step_within_budget(model: nn.Module, targets: list[Target], step: StepDirections,
                       heldout: Sequence[Sequence[int]], *, budget: float, unedited_ppl: float | None = None,
                       max_norm: float | None = None, steps: int = 10, pad_id: int = 0, batch_size: int = 16,
                       progress: bool = False) -> tuple[float, Bisection]:
    """The largest step norm within `budget` x the unedited held-out perplexity, bisected on
    (0, `max_norm`] (default: the deletion's norm); the model is left as it was.

    Returns:
        (the chosen norm, 0.0 when none fits; the bisection, whose amount `a` is the norm
        `(1 - a) * max_norm`).

    Raises:
        StepError: a budget below 1, or a non-positive `max_norm`.
    """
    if not budget >= 1:
        raise StepError(f"the perplexity budget is a ratio to the unedited perplexity, at least 1, got {budget}")
    top = step.deletion_norm if max_norm is None else max_norm
    if not top > 0:
        raise StepError(f"the largest step norm must be positive, got {top}")

    def measure() -> float:
        return perplexity(model, heldout, pad_id=pad_id, batch_size=batch_size).perplexity

    target = budget * (measure() if unedited_ppl is None else unedited_ppl)
    found = bisect_edit(lambda amount: apply_step(targets, step, (1 - amount) * top), measure, target,
                        mode="within", gap=lambda ppl: abs(ppl / target - 1), steps=steps, progress=progress,
                        description=f"step norm for ppl {target:.4g}")
    return ((1 - found.amount) * top if found.edited else 0.0), found


def step_at_cost(model: nn.Module, targets: list[Target], bases: dict[str, Eigenbasis], block: EditRule,
                 windows: Sequence[Window], heldout: Sequence[Sequence[int]], *, budget: float, unedited_ppl: float,
                 max_multiple: float = 4.0, steps: int = 10, pad_id: int = 0, batch_size: int = 16
                 ) -> tuple[StepDirections, float, Bisection]:
    """The coherent step from `windows` in the components `block` deletes, at the largest norm
    (up to `max_multiple` x the deletion's) within `budget` x the unedited perplexity: what
    `edit --step-from ... --ppl-budget` takes, and what the demo and the study compare with
    K-FAC at its own cost.

    Returns:
        (the step's directions, the chosen norm (0.0 when none fits), the bisection).

    Raises:
        StepError: as `step_directions` and `step_within_budget`.
    """
    step = step_directions(forget_gradients(model, windows, targets, pad_id=pad_id, batch_size=batch_size), targets,
                           bases, block)
    norm, search = step_within_budget(model, targets, step, heldout, budget=max(1.0, budget), unedited_ppl=unedited_ppl,
                                      max_norm=max_multiple * step.deletion_norm, steps=steps, pad_id=pad_id,
                                      batch_size=batch_size)
    return step, norm, search

