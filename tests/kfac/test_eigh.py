"""Eigendecomposition precision: float32 with a float64 residual check, and its fallback."""

import pytest
import torch

import curvedit.kfac.spectrum as spectrum
from curvedit.kfac.factors import load_factors
from curvedit.kfac.spectrum import EIGEN_FILE, EighError, cached_eigenbases, sym_eigh
from tests.helpers import collected
from tests.tiny_models import tiny_gpt2


def psd(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * d, d, generator=g, dtype=torch.float64) * torch.linspace(2, 0.05, d, dtype=torch.float64)
    return x.T @ x / len(x)


def eigh_dtypes(monkeypatch):
    """Record the dtype of every `torch.linalg.eigh` call."""
    seen, real = [], torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: seen.append(m.dtype) or real(m))
    return seen


def test_float32_eigh_is_kept_when_its_residual_is_small(monkeypatch):
    mat = psd(48)
    seen = eigh_dtypes(monkeypatch)
    evals, evecs = sym_eigh(mat, precision="float32")
    assert seen == [torch.float32]
    assert evals.dtype == evecs.dtype == torch.float64
    ref_evals, _ = sym_eigh(mat)
    torch.testing.assert_close(evals, ref_evals, rtol=0, atol=1e-5 * float(ref_evals[0]))
    residual = torch.linalg.matrix_norm(mat @ evecs - evecs * evals) / torch.linalg.matrix_norm(mat)
    assert residual <= spectrum.EIGH_RESIDUAL_TOL
    assert bool((evals[:-1] >= evals[1:]).all()) and bool((evals >= 0).all())


def test_float32_eigh_falls_back_to_float64_when_the_residual_check_fails(monkeypatch):
    mat = psd(32, seed=1)
    monkeypatch.setattr(spectrum, "EIGH_RESIDUAL_TOL", 1e-14)  # no float32 result can pass
    seen = eigh_dtypes(monkeypatch)
    evals, evecs = sym_eigh(mat, precision="float32")
    assert seen == [torch.float32, torch.float64]
    monkeypatch.undo()
    ref_evals, ref_evecs = sym_eigh(mat)
    assert torch.equal(evals, ref_evals) and torch.equal(evecs, ref_evecs)


def test_float32_eigh_that_does_not_converge_falls_back_and_float64_failure_is_reported(monkeypatch):
    mat, real = psd(16, seed=2), torch.linalg.eigh

    def eigh(m, fail_on=(torch.float32,)):
        if m.dtype in fail_on:
            raise torch.linalg.LinAlgError("did not converge")
        return real(m)
    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    assert torch.equal(sym_eigh(mat, precision="float32")[0], sym_eigh(mat)[0])  # the float64 result
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: eigh(m, (torch.float32, torch.float64)))
    with pytest.raises(EighError, match="did not converge"):
        sym_eigh(mat, precision="float32")


def test_eigh_refuses_non_finite_matrices_and_unknown_precisions():
    mat = psd(8)
    mat[2, 3] = float("nan")
    with pytest.raises(EighError, match="NaN or inf"):
        sym_eigh(mat)
    with pytest.raises(ValueError, match="precision"):
        sym_eigh(psd(8), precision="bfloat16")


def test_a_float32_cache_never_serves_a_float64_request(tmp_path, monkeypatch):
    model = tiny_gpt2(dtype=torch.float32)
    factor_dir, targets = collected(tmp_path, model)
    factors = load_factors(factor_dir).targets
    names = [t.name for t in targets]
    cached_eigenbases(factor_dir, factors, names, precision="float32")
    seen = eigh_dtypes(monkeypatch)
    cached_eigenbases(factor_dir, factors, names, precision="float32")
    assert seen == []  # float32 cache serves float32
    cached_eigenbases(factor_dir, factors, names, precision="float64")
    assert seen == [torch.float64] * (2 * len(names))  # recomputed in float64
    stamp = (factor_dir / EIGEN_FILE).stat().st_mtime_ns
    cached_eigenbases(factor_dir, factors, names, precision="float32")
    assert seen == [torch.float64] * (2 * len(names)) and (factor_dir / EIGEN_FILE).stat().st_mtime_ns == stamp


def test_a_matrix_clearly_not_positive_semi_definite_is_refused_but_round_off_is_clamped():
    import pytest

    from curvedit.kfac.spectrum import EighError, sym_eigh

    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    for precision in ("float64", "float32"):
        with pytest.raises(EighError, match="not positive semi-definite"):
            sym_eigh(q @ torch.diag(torch.tensor([5.0, 3, 1, 0.5, 0.1, -0.5], dtype=torch.float64)) @ q.T,
                     precision=precision)
        evals, _ = sym_eigh(q @ torch.diag(torch.tensor([5.0, 3, 1, 0.5, 0.1, -1e-9], dtype=torch.float64)) @ q.T,
                            precision=precision)
        assert float(evals.min()) == 0.0
