"""Changing weights: the K-FAC edit, its controls and baselines, and how much to edit.

Modules:
    settings: how an edit is made (`EditSettings`: method, masses, seed, dtypes, device).
    edit: the edit itself (`EditPlan`, `EditRule`, `edit_model`, `apply_edit`, SVD truncation).
    targeted: components ranked by forget-set against general curvature.
    protect: keep what a protect population's curvature needs (`edit --protect`).
    step: a coherent step along a forget set's shared direction (`edit --step-from`).
    budget: the amount kept, bisected to a perplexity budget.
    sweep: a grid of placements and amounts, and the choice among them.
    balanced_subnet: the BalancedSubnet baseline.
"""

from curvedit.editing.balanced_subnet import BSNOptions, bsn_within_budget
from curvedit.editing.budget import BudgetError, bisect_amount, edit_within_budget
from curvedit.editing.edit import (
    AppliedEdit,
    EditError,
    EditPlan,
    EditRule,
    apply_edit,
    edit_model,
    save_edited_model,
    svd_truncate,
)
from curvedit.editing.protect import ProtectError, attach_protect_masses, protect_masses
from curvedit.editing.settings import METHODS, EditSettings
from curvedit.editing.step import StepError, step_directions, step_within_budget
from curvedit.editing.sweep import SweepError, SweepGrid, SweepOptions, run_sweep
from curvedit.editing.targeted import TargetedError, forget_masses, targeted_mask

__all__ = [
    "METHODS", "AppliedEdit", "BSNOptions", "BudgetError", "EditError", "EditPlan", "EditRule", "EditSettings",
    "ProtectError", "StepError", "SweepError", "SweepGrid", "SweepOptions", "TargetedError", "apply_edit",
    "attach_protect_masses", "bisect_amount", "bsn_within_budget", "edit_model", "edit_within_budget", "forget_masses",
    "protect_masses", "run_sweep", "save_edited_model", "step_directions", "step_within_budget", "svd_truncate",
    "targeted_mask",
]
