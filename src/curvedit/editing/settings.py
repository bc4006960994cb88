"""How an edit is made, in one frozen object every editing entry point takes.

`EditPlan`, `bisect_amount`, `edit_within_budget`, `SweepOptions` and the study's options
all hold one `EditSettings`: which method, which masses rank the components, the control's
seed, the dtype of the basis change, the precision of `eigh`, and the device. The string
options are `Literal` types, checked in one place (`EditSettings.validate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from curvedit.errors import CurveditError
from curvedit.kfac.spectrum import EIGH_PRECISIONS

Method = Literal["kfac", "svd", "random", "lowest", "identity", "noise"]
Masses = Literal["kfac", "ekfac", "targeted", "saliency"]
Precision = Literal["float64", "float32"]

METHODS: tuple[str, ...] = get_args(Method)
MASSES: tuple[str, ...] = get_args(Masses)
COMPUTE_DTYPES: tuple[str, ...] = get_args(Precision)
BASIS_METHODS = ("kfac", "identity", "noise")  # the selection itself is used (no control drawn from its count)
EIGENBASIS_METHODS = ("kfac", "random", "lowest", "noise")  # select components of the factors' eigenbasis


class EditError(CurveditError):
    """An edit that cannot be made as asked (no rule for a target, bad method, ...)."""


@dataclass(frozen=True)
class EditSettings:
    """How an edit is made (what is kept is the plan's rules or a bisected amount).

    Attributes:
        method: one of `METHODS`: "kfac" (the paper's edit), its controls "random",
            "lowest" and "noise", data-free "svd", and "identity" (the standard basis).
        masses: what ranks the components: "kfac" (`lam_i * mu_j`), "ekfac" (the
            eigenvalue-corrected `S` stored by `collect --eigencorrect`), "targeted" (the ratio
            of a forget set's masses to the general ones, `curvedit.editing.targeted`) or
            "saliency" (`lam_i mu_j C_ij^2`, the second-order cost of removing component (i, j)
            of the weight's coefficients `C = U_G^T W U_A`, as Optimal Brain Damage).
        seed: seed of the "random" and "noise" controls.
        compute_dtype: "float64" or "float32" for the basis change.
        eigh_precision: "float64", or "float32" with a residual check and float64 fallback
            (`curvedit.kfac.spectrum.sym_eigh`).
        device: where to run eigh and the basis change (None: the weights' device).
    """

    method: Method = "kfac"
    masses: Masses = "kfac"
    seed: int = 0
    compute_dtype: Precision = "float64"
    eigh_precision: Precision = "float64"
    device: str | None = None

    def __post_init__(self) -> None:
        """Check the settings (`validate`)."""
        self.validate()

    def validate(self) -> None:
        """Raise EditError for an unknown method, masses, dtype or precision, or a method and
        masses that do not go together."""
        if self.method not in METHODS:
            raise EditError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.masses not in MASSES:
            raise EditError(f"unknown masses {self.masses!r}; choose one of {MASSES}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise EditError(f"compute_dtype must be one of {list(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        if self.eigh_precision not in EIGH_PRECISIONS:
            raise EditError(f"eigh precision must be one of {list(EIGH_PRECISIONS)}, got {self.eigh_precision!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise EditError(f"seed must be an integer, got {self.seed!r}")
        if self.method == "identity" and self.masses != "saliency":
            raise EditError("method 'identity' makes every component (weight entry) equally curved: rank them with "
                            "masses 'saliency' (W_ij^2, magnitude pruning)")
