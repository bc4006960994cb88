"""Selection by curvature mass against a brute-force sort of all products."""

import pytest
import torch

import curvedit.kfac.spectrum as spectrum
from curvedit.kfac.spectrum import SelectionError, mass_curve, mass_fraction, select_by_count, select_by_mass, sym_eigh


def brute_force_mass(lam, mu, rho):
    """Sort all products descending (stable: ties in row-major order) and take the
    shortest prefix whose cumulative mass reaches rho * total."""
    prod = (lam.double()[:, None] * mu.double()[None, :]).flatten()
    mask = torch.zeros_like(prod, dtype=torch.bool)
    if rho == 1:
        return mask.logical_not().view(lam.numel(), mu.numel())
    order = torch.sort(prod, descending=True, stable=True).indices
    cum = prod[order].cumsum(0)
    need = rho * float(lam.double().sum()) * float(mu.double().sum())
    k = int((cum < need).sum()) + 1 if need > 0 else 0
    mask[order[:k]] = True
    return mask.view(lam.numel(), mu.numel())


def brute_force_count(lam, mu, fraction):
    prod = (lam.double()[:, None] * mu.double()[None, :]).flatten()
    order = torch.sort(prod, descending=True, stable=True).indices
    mask = torch.zeros_like(prod, dtype=torch.bool)
    mask[order[: round(fraction * prod.numel())]] = True
    return mask.view(lam.numel(), mu.numel())


def spectra(kind, seed, m=23, n=17):
    g = torch.Generator().manual_seed(seed)
    if kind == "continuous":
        lam, mu = torch.rand(m, generator=g, dtype=torch.float64) ** 3, torch.rand(n, generator=g, dtype=torch.float64)
    elif kind == "ties":  # small integers: many equal products, exact float arithmetic
        lam = torch.randint(0, 4, (m,), generator=g).double()
        mu = torch.randint(1, 5, (n,), generator=g).double()
    else:  # zeros: rank-deficient factors
        lam = torch.rand(m, generator=g, dtype=torch.float64)
        mu = torch.rand(n, generator=g, dtype=torch.float64)
        lam[m // 2:] = 0
        mu[-3:] = 0
    return lam.sort(descending=True).values, mu.sort(descending=True).values


RHOS = [1e-6, 0.05, 0.3, 0.6, 0.75, 0.9, 0.999, 1.0]


@pytest.mark.parametrize("kind", ["continuous", "ties", "zeros"])
@pytest.mark.parametrize("seed", range(4))
def test_selection_by_mass_equals_sorting_all_products(kind, seed):
    lam, mu = spectra(kind, seed)
    for rho in RHOS:
        assert torch.equal(select_by_mass(lam, mu, rho), brute_force_mass(lam, mu, rho)), (kind, seed, rho)


@pytest.mark.parametrize("kind", ["continuous", "ties", "zeros"])
@pytest.mark.parametrize("shape", [(23, 17), (300, 200)])
def test_the_bracketed_search_equals_sorting_all_products(kind, shape, monkeypatch):
    monkeypatch.setattr(spectrum, "CANDIDATES", 16)  # bracket the cut instead of sorting everything
    lam, mu = spectra(kind, 3, *shape)
    for rho in RHOS:
        assert torch.equal(select_by_mass(lam, mu, rho), brute_force_mass(lam, mu, rho)), (kind, shape, rho)
    for fraction in [0.003, 0.1, 0.5, 0.77, 1.0]:
        assert torch.equal(select_by_count(lam, mu, fraction), brute_force_count(lam, mu, fraction)), (kind, fraction)


@pytest.mark.parametrize("kind", ["continuous", "ties", "zeros"])
def test_kept_mass_reaches_rho_and_dropping_the_last_kept_pair_falls_below(kind):
    lam, mu = spectra(kind, 11)
    prod = lam[:, None] * mu[None, :]
    total = float(prod.sum())
    for rho in RHOS[:-1]:
        mask = select_by_mass(lam, mu, rho)
        kept = float(prod[mask].sum())
        assert kept >= rho * total * (1 - 1e-12)
        smallest = float(prod[mask].min())
        assert kept - smallest < rho * total
        assert mass_fraction(lam, mu, mask) == pytest.approx(kept / total)


@pytest.mark.parametrize("kind", ["continuous", "ties", "zeros"])
def test_selection_by_count_equals_sorting_all_products(kind):
    lam, mu = spectra(kind, 5)
    for fraction in [0.003, 0.1, 0.5, 0.77, 1.0]:
        assert torch.equal(select_by_count(lam, mu, fraction), brute_force_count(lam, mu, fraction))


def test_rho_one_keeps_everything_including_zero_mass():
    lam, mu = spectra("zeros", 0)
    assert select_by_mass(lam, mu, 1.0).all()


def test_invalid_requests_are_refused():
    lam, mu = spectra("continuous", 0)
    for rho in (0, -0.1, 1.5):
        with pytest.raises(SelectionError, match="rho must be in"):
            select_by_mass(lam, mu, rho)
    with pytest.raises(SelectionError, match="sorted descending"):
        select_by_mass(lam.flip(0), mu, 0.5)
    with pytest.raises(SelectionError, match="keep fraction"):
        select_by_count(lam, mu, 0)


def test_eigh_is_sorted_descending_clamped_and_orthonormal():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 9, generator=g, dtype=torch.float64)
    cov = (x.T @ x).float()  # rank 5, float32: round-off may give tiny negative eigenvalues
    evals, evecs = sym_eigh(cov)
    assert evals.dtype == torch.float64 and (evals >= 0).all() and (evals[1:] <= evals[:-1]).all()
    torch.testing.assert_close(evecs.T @ evecs, torch.eye(9, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(evecs @ torch.diag(evals) @ evecs.T, cov.double(), atol=1e-4, rtol=1e-5)


def test_mass_curve_is_monotone_and_ends_at_everything_positive():
    lam, mu = spectra("continuous", 3)
    frac, mass = mass_curve(lam, mu, points=50)
    assert (frac[1:] >= frac[:-1]).all() and (mass[1:] >= mass[:-1]).all()
    assert float(mass[-1]) == pytest.approx(1.0) and float(frac[-1]) == pytest.approx(1.0)
