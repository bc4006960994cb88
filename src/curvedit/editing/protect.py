"""Protected edits: keep what carries a capability the user names (`edit --protect FACTORS`).

The general K-FAC edit keeps the components of highest general curvature mass
`lam_i mu_j`; what a capability needs but the general data rarely exercises looks flat and is
removed. Given factors `A_p`, `G_p` collected as usual on the population to keep (arithmetic
items, fact prompts, any text), its curvature is expressed in the *general* eigenbasis:
component (i, j) gets the protect mass

    p_i q_j,   p_i = u_i^T G_p u_i,   q_j = v_j^T A_p v_j,

with `u_i`, `v_j` the eigenvectors of the general G and A. The edit keeps a component when it
is in the general kept set OR in the protect kept set, the top protect mass at the protect
amount (`rho` or a keep fraction; by default the edit's own amount). Protecting with the
general factors themselves gives `p = lam`, `q = mu`, the same selection, so the plain edit.
The protect selection ranks the products `p_i q_j` with the staircase search of
`curvedit.kfac.spectrum` after sorting `p` and `q` (ties in row-major order of the sorted axes).
"""

from __future__ import annotations

import torch

from curvedit.errors import CurveditError
from curvedit.kfac.factors import FactorSet
from curvedit.kfac.spectrum import Eigenbasis, select_by_count, select_by_mass


class ProtectError(CurveditError):
    """Protect factors that cannot be used with these eigenbases."""


def protect_masses(basis: Eigenbasis, g_p: torch.Tensor, a_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The protect population's curvature along the general eigenvectors.

    Args:
        basis: the general eigenbasis of a target.
        g_p: `(d_out, d_out)` the protect population's output-gradient second moment.
        a_p: `(d_in, d_in)` its input second moment.

    Returns:
        (`p` `(d_out,)` = diag(U_G^T G_p U_G), `q` `(d_in,)` = diag(U_A^T A_p U_A)), float64,
        round-off negatives clamped to 0.
    """
    u_g, u_a = basis.U_G.double(), basis.U_A.double()
    p_o = (u_g * (g_p.to(u_g) @ u_g)).sum(0).clamp(min=0)
    q_i = (u_a * (a_p.to(u_a) @ u_a)).sum(0).clamp(min=0)
    return p_o, q_i


def attach_protect_masses(bases: dict[str, Eigenbasis], protect: FactorSet) -> None:
    """Put each target's protect masses on its eigenbasis (`Eigenbasis.protect`).

    Raises:
        ProtectError: a target the protect factors do not cover, or of another shape.
    """
    for name, basis in bases.items():
        tf = protect.targets.get(name)
        if tf is None:
            raise ProtectError(f"the protect factors hold no {name}; collect them for the same targets")
        if tf.G.shape[0] != basis.lam.shape[0] or tf.A.shape[0] != basis.mu.shape[0]:
            raise ProtectError(f"{name}: protect factors of shape {tuple(tf.G.shape)} x {tuple(tf.A.shape)} for a "
                               f"{basis.lam.shape[0]} x {basis.mu.shape[0]} weight")
        basis.protect = protect_masses(basis, tf.G, tf.A)


def protect_mask(p_o: torch.Tensor, q_i: torch.Tensor, rho: float | None, keep_fraction: float | None
                 ) -> torch.Tensor:
    """The top protect-mass components `p_i q_j`: the fewest whose mass reaches `rho` of the
    total, or the top `keep_fraction` of them.

    Returns:
        `(d_out, d_in)` bool mask, in the basis' own (general) order.

    Raises:
        curvedit.kfac.spectrum.SelectionError: an invalid amount or all-zero protect masses.
    """
    rows = torch.argsort(p_o, descending=True, stable=True)
    cols = torch.argsort(q_i, descending=True, stable=True)
    p_sorted, q_sorted = p_o[rows], q_i[cols]
    sorted_mask = (select_by_mass(p_sorted, q_sorted, rho) if rho is not None
                   else select_by_count(p_sorted, q_sorted, keep_fraction))
    mask = torch.empty_like(sorted_mask)
    mask[rows[:, None], cols[None, :]] = sorted_mask
    return mask
