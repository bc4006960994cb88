"""The curvature eigenbasis of a weight and the selection of components by curvature mass.

For factors `G = U_G diag(lam) U_G^T` and `A = U_A diag(mu) U_A^T` (eigenvalues sorted
descending, round-off negatives clamped to 0), component `(i, j)` of a weight has mass
`lam_i * mu_j`. Sorted products form, in every row `i`, a non-increasing sequence in `j`;
so any prefix of the descending order of all products is a *staircase*: row `i` keeps
the columns `j < kept[i]`. Selection brackets the cut with a threshold search over product
values (vectorised over rows, exact float comparisons at the bracket's ends) and sorts only
the few products inside the bracket; never a Python loop over pairs.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from curvedit.errors import CurveditError
from curvedit.io import file_sha256, write_safetensors
from curvedit.kfac.factors import FACTORS_FILE, FactorError, TargetFactors, check_factors_match, load_factors
from curvedit.kfac.targets import Target

EIGEN_FILE = "eigenbasis.safetensors"


class SelectionError(CurveditError):
    """A selection request that makes no sense (rho outside (0, 1], negative spectra)."""


@dataclass
class Eigenbasis:
    """Eigendecompositions of a target's factors, float64, eigenvalues descending.

    Attributes:
        lam: `(d_out,)` eigenvalues of G.
        U_G: `(d_out, d_out)` eigenvectors of G (columns).
        mu: `(d_in,)` eigenvalues of A.
        U_A: `(d_in, d_in)` eigenvectors of A (columns).
        S: `(d_out, d_in)` eigenvalue-corrected masses measured in this basis
            (`curvedit.kfac.eigencorrect`), or None.
        forget: `(d_out, d_in)` a forget set's masses in this basis (`curvedit.editing.targeted`), or None.
        protect: (`p` `(d_out,)`, `q` `(d_in,)`) a protected population's curvature along these
            eigenvectors (`curvedit.editing.protect`), or None.
    """

    lam: torch.Tensor
    U_G: torch.Tensor
    mu: torch.Tensor
    U_A: torch.Tensor
    S: torch.Tensor | None = None
    forget: torch.Tensor | None = None
    protect: tuple[torch.Tensor, torch.Tensor] | None = None

    def to(self, device: torch.device | str | None, dtype: torch.dtype) -> "Eigenbasis":
        """A copy on `device` in `dtype` (the optional masses too, when present)."""
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)
        protect = None if self.protect is None else (move(self.protect[0]), move(self.protect[1]))
        return Eigenbasis(move(self.lam), move(self.U_G), move(self.mu), move(self.U_A), move(self.S),
                          move(self.forget), protect)


def identity_bases(targets: list[Target]) -> dict[str, "Eigenbasis"]:
    """The standard basis for every target (A = I, G = I): components are weight entries and
    every K-FAC mass is 1 (the `identity` method's control; with saliency masses it ranks entries by
    `W_ij^2`, i.e. magnitude pruning)."""
    bases = {}
    for target in targets:
        d_out, d_in = target.shape_oi
        bases[target.name] = Eigenbasis(torch.ones(d_out, dtype=torch.float64), torch.eye(d_out, dtype=torch.float64),
                                        torch.ones(d_in, dtype=torch.float64), torch.eye(d_in, dtype=torch.float64))
    return bases


def basis_sha256(basis: Eigenbasis) -> str:
    """SHA-256 of an eigenbasis' eigenvectors as float64 bytes (`U_G`, then `U_A`)."""
    digest = hashlib.sha256()
    for matrix in (basis.U_G, basis.U_A):
        digest.update(matrix.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return digest.hexdigest()


EIGH_PRECISIONS = ("float64", "float32")
EIGH_RESIDUAL_TOL = 1e-4


class EighError(CurveditError, RuntimeError):
    """A matrix that cannot be eigendecomposed (NaN/inf entries, or no convergence)."""


def _eigh_residual(mat64: torch.Tensor, evals: torch.Tensor, evecs: torch.Tensor) -> float:
    """Backward error of an eigendecomposition, measured in float64:
    `max(||M V - V diag(w)||_F / ||M||_F, ||V^T V - I||_F / sqrt(d))`."""
    v64, w64 = evecs.double(), evals.double()
    scale = float(torch.linalg.matrix_norm(mat64)) or 1.0
    residual = float(torch.linalg.matrix_norm(mat64 @ v64 - v64 * w64)) / scale
    eye = torch.eye(v64.shape[0], dtype=torch.float64, device=v64.device)
    orthogonality = float(torch.linalg.matrix_norm(v64.T @ v64 - eye)) / math.sqrt(v64.shape[0])
    return max(residual, orthogonality)


def sym_eigh(matrix: torch.Tensor, device: str | torch.device | None = None, precision: str = "float64"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition of a symmetric PSD matrix: symmetrised, sorted descending,
    negative round-off clamped to 0, returned in float64.

    `precision="float32"` runs `eigh` in float32 (several times faster on GPUs) and keeps
    the result only when its backward error, measured in float64 (`M V - V diag(w)` and
    `V^T V - I`, relative), is at most `EIGH_RESIDUAL_TOL`; otherwise it recomputes in
    float64.

    Args:
        matrix: `(d, d)` symmetric matrix (any float dtype).
        device: where to run `eigh` (default: the matrix's device).
        precision: "float64" or "float32" (with the residual check and fallback).

    Returns:
        (eigenvalues `(d,)`, eigenvectors `(d, d)` as columns), float64, on `device`.

    Raises:
        ValueError: an unknown precision.
        EighError: the matrix holds NaN or inf, has an eigenvalue clearly below zero (not
            PSD beyond round-off), or float64 `eigh` does not converge.
    """
    if precision not in EIGH_PRECISIONS:
        raise ValueError(f"eigh precision must be one of {EIGH_PRECISIONS}, got {precision!r}")
    mat = matrix.to(device=device or matrix.device, dtype=torch.float64)
    mat = (mat + mat.T) / 2
    if not bool(torch.isfinite(mat).all()):
        raise EighError(f"cannot eigendecompose a {tuple(mat.shape)} matrix holding NaN or inf")
    if precision == "float32":
        try:
            evals, evecs = torch.linalg.eigh(mat.float())
        except torch.linalg.LinAlgError:
            evals = evecs = None  # no convergence in float32: float64 below
        if evecs is not None and bool(torch.isfinite(evecs).all()) \
                and _eigh_residual(mat, evals, evecs) <= EIGH_RESIDUAL_TOL and _is_psd(evals.double()):
            return evals.double().flip(0).clamp_(min=0), evecs.double().flip(1)  # else float64 decides below
    try:
        evals, evecs = torch.linalg.eigh(mat)
    except torch.linalg.LinAlgError as err:
        raise EighError(f"eigh of a {tuple(mat.shape)} matrix did not converge: {err}") from None
    _check_psd(evals, tuple(mat.shape))
    return evals.flip(0).clamp_(min=0), evecs.flip(1)


NEGATIVE_TOL = 1e-4  # an eigenvalue below -NEGATIVE_TOL * the largest |eigenvalue| is not round-off


def _is_psd(evals: torch.Tensor) -> bool:
    """No eigenvalue clearly below zero."""
    return not (evals.numel() and float(evals.min()) < -NEGATIVE_TOL * float(evals.abs().max()))


def _check_psd(evals: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Refuse a matrix with an eigenvalue clearly below zero (a second moment is PSD)."""
    if not _is_psd(evals):
        raise EighError(f"a {shape} factor has eigenvalue {float(evals.min()):.3g} (largest "
                        f"{float(evals.max()):.3g}): not positive semi-definite beyond round-off, so not a second "
                        "moment; the factor file was altered or damaged")


def eigenbasis(factors: TargetFactors, device: str | torch.device | None = None, precision: str = "float64"
               ) -> Eigenbasis:
    """Eigendecompose both factors of a target (see `sym_eigh`)."""
    lam, u_g = sym_eigh(factors.G, device, precision)
    mu, u_a = sym_eigh(factors.A, device, precision)
    return Eigenbasis(lam=lam, U_G=u_g, mu=mu, U_A=u_a)


def cached_eigenbases(factor_dir: str | Path, factors: dict[str, TargetFactors], names: list[str],
                      device: str | torch.device | None = None, precision: str = "float64"
                      ) -> dict[str, Eigenbasis]:
    """Eigenbases for `names`, read from `factor_dir/eigenbasis.safetensors` when it was
    made from the current factor file, computed (and the cache rewritten) otherwise.

    The cache records the SHA-256 of `factors.safetensors`; any change to the factors
    invalidates it. A cache made in float64 serves any request; one made with
    `precision="float32"` serves only float32 requests. A read-only factor directory just
    skips writing the cache.

    Returns:
        name -> `Eigenbasis` (float64, on `device`, default CPU).
    """
    root = Path(factor_dir)
    cache_path = root / EIGEN_FILE
    factors_sha = file_sha256(root / FACTORS_FILE)
    cached: dict[str, torch.Tensor] = {}
    cached_precision = "float64"
    if cache_path.is_file():
        with safe_open(str(cache_path), framework="pt") as handle:
            meta = handle.metadata() or {}
        if meta.get("factors_sha256") == factors_sha and meta.get("precision", "float64") in ("float64", precision):
            cached, cached_precision = load_file(str(cache_path)), meta.get("precision", "float64")
    bases: dict[str, Eigenbasis] = {}
    computed = False
    for name in names:
        keys = [f"{name}.{k}" for k in ("lam", "U_G", "mu", "U_A")]
        if all(k in cached for k in keys):
            bases[name] = Eigenbasis(*(cached[k].to(device or "cpu") for k in keys))
        else:
            bases[name] = eigenbasis(factors[name], device, precision)
            computed = True
    if computed:
        merged = dict(cached)
        for name, basis in bases.items():
            for key in ("lam", "U_G", "mu", "U_A"):
                merged[f"{name}.{key}"] = getattr(basis, key)
        merged_precision = "float64" if precision == cached_precision == "float64" else "float32"
        try:
            write_safetensors(cache_path, merged, metadata={"factors_sha256": factors_sha,
                                                            "precision": merged_precision})
        except OSError:
            pass  # a read-only factor directory: the cache is an optimisation only
    return bases


def load_bases(targets: list[Target], factor_dir: str | Path, device: str | torch.device | None = None,
               precision: str = "float64") -> dict[str, Eigenbasis]:
    """Eigenbases of the targets' factors, checked against the model and cached on disk.

    Args:
        targets: the targets (their factors must be in `factor_dir`).
        factor_dir: the factor directory.
        device: where to run `eigh` (default CPU).
        precision: "float64", or "float32" with a residual check (see `sym_eigh`).

    Returns:
        Target name -> `Eigenbasis` (computed once, then read from the cache).

    Raises:
        curvedit.kfac.factors.FactorError: factors missing, of another model, or wrong shapes.
    """
    factors = load_factors(factor_dir)
    check_factors_match(factors, targets)
    bases = cached_eigenbases(factor_dir, factors.targets, [t.name for t in targets], device, precision)
    for name, basis in bases.items():
        tf = factors.targets[name]
        if tf.S is None:
            continue
        if basis_sha256(basis) != tf.S_basis_sha256:
            raise FactorError(f"{factor_dir}: {name}: the eigenvalue-corrected masses were measured in another "
                              "eigenbasis than the one in use (eigenbasis.safetensors recomputed elsewhere?); run "
                              "collect --eigencorrect again")
        basis.S = tf.S.to(basis.lam)
    return bases


def refresh_eigenbasis_cache(factor_dir: str | Path) -> None:
    """Point a factor folder's eigenbasis cache at its current factor file after a rewrite that
    kept A and G (adding eigenvalue-corrected masses), so the basis they were measured in stays
    in use."""
    cache_path = Path(factor_dir) / EIGEN_FILE
    if not cache_path.is_file():
        return
    with safe_open(str(cache_path), framework="pt") as handle:
        meta = handle.metadata() or {}
    write_safetensors(cache_path, load_file(str(cache_path)),
                      metadata={**meta, "factors_sha256": file_sha256(Path(factor_dir) / FACTORS_FILE)})


def _row_counts(lam: torch.Tensor, mu: torch.Tensor, t: float, strict: bool) -> torch.Tensor:
    """Per row i, the number of j with `lam_i * mu_j >= t` (or `> t` if strict).

    Exact: a vectorised binary search over j that compares float products directly
    (products in a row are non-increasing because mu is sorted descending).
    """
    n = mu.shape[0]
    lo = torch.zeros_like(lam, dtype=torch.long)
    hi = torch.full_like(lo, n)
    for _ in range(max(1, math.ceil(math.log2(n + 1))) + 1):
        mid = (lo + hi) // 2
        prod = lam * mu[mid.clamp(max=n - 1)]
        inside = (prod > t) if strict else (prod >= t)
        inside &= mid < n
        lo = torch.where(inside, mid + 1, lo)
        hi = torch.where(inside, hi, mid)
    return lo


def _measure(lam: torch.Tensor, cum_mu: torch.Tensor, counts: torch.Tensor, by: str) -> float:
    if by == "count":
        return float(counts.sum())
    return float((lam * cum_mu[counts]).sum())


CANDIDATES = 1 << 15  # products enumerated and sorted explicitly at the cut


def _approx_row_counts(lam: torch.Tensor, neg_mu: torch.Tensor, t: float) -> torch.Tensor:
    """Per row, about how many j have `lam_i * mu_j >= t` (`mu_j >= t / lam_i` by binary
    search; the division may be off by an ulp). Only steers the bracketing."""
    return torch.searchsorted(neg_mu, -(t / lam), right=True)


def _bracket(lam: torch.Tensor, mu: torch.Tensor, cum_mu: torch.Tensor, need: float, by: str
             ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Staircases `k_hi <= k_lo` with `measure(k_hi) < need <= measure(k_lo)` and few
    products between them: a bisection in log value with approximate counts, then exact
    counts at the two thresholds. None when even every product does not reach `need`
    (round-off at rho close to 1)."""
    m, n = lam.shape[0], mu.shape[0]
    full = torch.full_like(lam, n, dtype=torch.long)
    if _measure(lam, cum_mu, full, by) < need:
        return None
    positive = lam[lam > 0].min() * mu[mu > 0].min() if bool(lam[0] > 0) and bool(mu[0] > 0) else None
    if m * n <= CANDIDATES or positive is None:
        return torch.zeros_like(full), full
    neg_mu = -mu
    hi_t = math.nextafter(float(lam[0] * mu[0]), math.inf)  # nothing reaches it
    lo_t = float(positive)  # every positive product reaches it
    if _measure(lam, cum_mu, _row_counts(lam, mu, lo_t, strict=False), by) < need:
        return _row_counts(lam, mu, lo_t, strict=False), full  # zero products complete the mass
    c_lo, c_hi = _approx_row_counts(lam, neg_mu, lo_t), _approx_row_counts(lam, neg_mu, hi_t)
    for _ in range(200):
        mid = math.sqrt(lo_t) * math.sqrt(hi_t)
        if int((c_lo - c_hi).sum()) <= CANDIDATES or not lo_t < mid < hi_t:
            break
        c_mid = _approx_row_counts(lam, neg_mu, mid)
        if _measure(lam, cum_mu, c_mid, by) >= need:
            lo_t, c_lo = mid, c_mid
        else:
            hi_t, c_hi = mid, c_mid
    k_hi = _row_counts(lam, mu, hi_t, strict=False)
    while _measure(lam, cum_mu, k_hi, by) >= need:  # the approximate counts erred: widen
        hi_t *= 2
        k_hi = _row_counts(lam, mu, hi_t, strict=False)
    k_lo = _row_counts(lam, mu, lo_t, strict=False)
    while _measure(lam, cum_mu, k_lo, by) < need:
        lo_t /= 2
        k_lo = _row_counts(lam, mu, lo_t, strict=False)
    return k_hi, k_lo


def staircase(lam: torch.Tensor, mu: torch.Tensor, need: float, by: str) -> torch.Tensor:
    """The shortest prefix of all products in descending order (ties in row-major order)
    whose mass (`by="mass"`) or count (`by="count"`) reaches `need`.

    The products above a bracket are kept whole; the few inside it (at most about
    `CANDIDATES`) are enumerated, sorted (stable, so ties stay in row-major order) and
    taken until `need` is reached. A bracket that cannot be narrowed holds one group of
    equal products (zeros, or exact ties); it is taken in row-major order without
    enumerating it.

    Args:
        lam: `(m,)` non-negative, sorted descending.
        mu: `(n,)` non-negative, sorted descending.
        need: the mass or count to reach (at most the total).
        by: "mass" or "count".

    Returns:
        `(m,)` long: row i keeps columns `j < kept[i]`.
    """
    lam, mu = lam.double(), mu.double()
    cum_mu = torch.cat([mu.new_zeros(1), mu.cumsum(0)])
    if need <= 0:
        return torch.zeros_like(lam, dtype=torch.long)
    bracket = _bracket(lam, mu, cum_mu, need, by)
    if bracket is None:
        return torch.full_like(lam, mu.shape[0], dtype=torch.long)
    k_hi, k_lo = bracket
    widths = k_lo - k_hi
    have = _measure(lam, cum_mu, k_hi, by)
    rows_with = widths > 0
    first = lam[rows_with] * mu[k_hi[rows_with]]
    last = lam[rows_with] * mu[k_lo[rows_with] - 1]
    if int(widths.sum()) > CANDIDATES and bool((first == last).all()) and bool((first == first[0]).all()):
        return k_hi + _take_tied(widths, float(first[0]), need - have, by)
    rows = torch.repeat_interleave(torch.arange(lam.shape[0], device=lam.device), widths)
    starts = widths.cumsum(0) - widths
    cols = k_hi[rows] + torch.arange(rows.shape[0], device=lam.device) - starts[rows]
    values = lam[rows] * mu[cols]  # row-major order
    order = torch.sort(values, descending=True, stable=True).indices
    if by == "count":
        take = math.ceil(need - have)
    else:
        take = int(((have + values[order].cumsum(0)) < need).sum()) + 1
    take = min(take, rows.shape[0])
    return k_hi + torch.bincount(rows[order[:take]], minlength=lam.shape[0])


def _take_tied(widths: torch.Tensor, value: float, missing: float, by: str) -> torch.Tensor:
    """Per row, how many of a group of equal products (`widths[i]` in row i) to take in
    row-major order to add `missing` mass (each product adds `value`) or count."""
    unit = 1.0 if by == "count" else value
    available = int(widths.sum())
    extra = max(0, math.ceil(missing / unit)) if unit > 0 else available
    while extra > 0 and (extra - 1) * unit >= missing:  # undo round-off in the division
        extra -= 1
    while extra * unit < missing and extra < available:
        extra += 1
    before = widths.cumsum(0) - widths
    return (extra - before).clamp(min=0).minimum(widths)


def staircase_mask(kept: torch.Tensor, n: int) -> torch.Tensor:
    """`(m, n)` bool mask of a staircase (row i keeps columns `j < kept[i]`)."""
    return torch.arange(n, device=kept.device)[None, :] < kept[:, None]


def _check_spectra(lam: torch.Tensor, mu: torch.Tensor) -> None:
    if (lam < 0).any() or (mu < 0).any():
        raise SelectionError("eigenvalues must be non-negative (clamp round-off first)")
    if (lam[1:] > lam[:-1]).any() or (mu[1:] > mu[:-1]).any():
        raise SelectionError("eigenvalues must be sorted descending")
    if not (lam.numel() and mu.numel() and lam[0] > 0 and mu[0] > 0):
        raise SelectionError("degenerate factors: every eigenvalue of G or of A is zero (no curvature mass to "
                             "rank components by); collect on more or other data")


def select_by_mass(lam: torch.Tensor, mu: torch.Tensor, rho: float) -> torch.Tensor:
    """Keep the fewest components, in descending mass `lam_i * mu_j`, whose mass reaches
    `rho * sum(lam) * sum(mu)`; ties in row-major order. `rho = 1` keeps every component
    (zero-mass ones too), so the edit is the identity.

    Args:
        lam: `(m,)` eigenvalues of G, sorted descending, non-negative.
        mu: `(n,)` eigenvalues of A, sorted descending, non-negative.
        rho: the fraction of curvature mass to keep, in (0, 1].

    Returns:
        `(m, n)` bool mask of kept components.

    Raises:
        SelectionError: rho outside (0, 1], or unsorted/negative/all-zero spectra.
    """
    if not 0 < rho <= 1:
        raise SelectionError(f"rho must be in (0, 1], got {rho}")
    _check_spectra(lam, mu)
    if rho == 1:
        return torch.ones(lam.shape[0], mu.shape[0], dtype=torch.bool, device=lam.device)
    need = rho * float(lam.double().sum()) * float(mu.double().sum())
    return staircase_mask(staircase(lam, mu, need, "mass"), mu.shape[0])


def select_by_count(lam: torch.Tensor, mu: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """Keep `round(keep_fraction * m * n)` components of highest mass (ties row-major).

    Raises:
        SelectionError: keep_fraction outside (0, 1] or keeping no component, or
            unsorted/negative/all-zero spectra.
    """
    if not 0 < keep_fraction <= 1:
        raise SelectionError(f"keep fraction must be in (0, 1], got {keep_fraction}")
    _check_spectra(lam, mu)
    total = lam.shape[0] * mu.shape[0]
    count = round(keep_fraction * total)
    if count == 0:
        raise SelectionError(f"keep fraction {keep_fraction} keeps no component of {lam.shape[0]} x {mu.shape[0]} "
                             f"(the edit would zero the weight); the smallest useful fraction is {0.5 / total:.2g}")
    return staircase_mask(staircase(lam, mu, count, "count"), mu.shape[0])


def select_by_masses(masses_oi: torch.Tensor, rho: float | None = None, keep_fraction: float | None = None
                     ) -> torch.Tensor:
    """Keep the components of highest mass in a general `(m, n)` mass matrix (EK-FAC's S):
    the fewest, in descending mass, whose mass reaches `rho` of the total, or the top
    `round(keep_fraction * m * n)`; ties broken by row-major order.

    Args:
        masses_oi: `(m, n)` non-negative masses.
        rho: fraction of the total mass to keep, in (0, 1].
        keep_fraction: fraction of the components to keep, in (0, 1].

    Returns:
        `(m, n)` bool mask of kept components.

    Raises:
        SelectionError: both or neither amount, an amount outside (0, 1], negative or
            non-finite or all-zero masses, or a selection keeping nothing.
    """
    if (rho is None) == (keep_fraction is None):
        raise SelectionError("give exactly one of rho and keep_fraction")
    amount = rho if rho is not None else keep_fraction
    if not 0 < amount <= 1:
        raise SelectionError(f"{'rho' if rho is not None else 'keep fraction'} must be in (0, 1], got {amount}")
    flat = masses_oi.double().flatten()
    if not torch.isfinite(flat).all() or bool((flat < 0).any()) or float(flat.sum()) == 0:
        raise SelectionError("eigenvalue-corrected masses must be finite, non-negative and not all zero")
    if amount == 1:
        return torch.ones_like(masses_oi, dtype=torch.bool)
    order = torch.sort(flat, descending=True, stable=True).indices
    if rho is not None:
        count = int(torch.searchsorted(flat[order].cumsum(0), rho * float(flat.sum()))) + 1
    else:
        count = round(keep_fraction * flat.numel())
    if count == 0:
        raise SelectionError(f"keep fraction {keep_fraction} keeps no component of {tuple(masses_oi.shape)}")
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=masses_oi.device)
    mask[order[: min(count, flat.numel())]] = True
    return mask.view(masses_oi.shape)


def mass_fraction(lam: torch.Tensor, mu: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of the total curvature mass held by the components in `mask`."""
    total = float(lam.double().sum() * mu.double().sum())
    if total == 0:
        return 0.0
    return float((lam.double()[:, None] * mu.double()[None, :])[mask].sum()) / total


def mass_curve(lam: torch.Tensor, mu: torch.Tensor, points: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """The cumulative mass curve of the sorted products, sampled at `points` thresholds.

    Returns:
        (fraction of components kept, fraction of mass kept), both increasing, float64.
    """
    lam, mu = lam.double(), mu.double()
    cum_mu = torch.cat([mu.new_zeros(1), mu.cumsum(0)])
    total_mass = float(lam.sum() * mu.sum()) or 1.0
    top = float(lam[0] * mu[0])
    low = float(lam[lam > 0].min() * mu[mu > 0].min()) if top > 0 else 0.0
    if top == 0:
        return torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([0.0, 0.0], dtype=torch.float64)
    thresholds = torch.logspace(math.log10(top), math.log10(low), points, dtype=torch.float64)
    thresholds[0], thresholds[-1] = top, low  # exact ends despite log/exp round-off
    fracs, masses = [], []
    for t in thresholds.tolist():
        counts = _row_counts(lam, mu, t, strict=False)
        fracs.append(float(counts.sum()) / (lam.numel() * mu.numel()))
        masses.append(_measure(lam, cum_mu, counts, "mass") / total_mass)
    return torch.tensor(fracs, dtype=torch.float64), torch.tensor(masses, dtype=torch.float64)
