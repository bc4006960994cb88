"""The edit: closed-form properties and an independent float64 recomputation."""


import numpy as np
import pytest
import torch

from curvedit.editing.edit import (
    EditError,
    EditPlan,
    EditRule,
    apply_edit,
    change_basis_and_mask,
    edit_model,
    svd_truncate,
)
from curvedit.editing.settings import METHODS, EditSettings
from curvedit.kfac.factors import FactorError, TargetFactors
from curvedit.kfac.spectrum import eigenbasis, select_by_mass
from curvedit.kfac.targets import TargetSpec, select_targets
from tests.helpers import collected
from tests.tiny_models import tiny_gpt2


def random_factors(d_out, d_in, seed=0, decay=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * d_in, d_in, generator=g, dtype=torch.float64)
    y = torch.randn(3 * d_out, d_out, generator=g, dtype=torch.float64)
    if decay:
        x = x * torch.linspace(2, 0.1, d_in, dtype=torch.float64)
        y = y * torch.linspace(1, 0.01, d_out, dtype=torch.float64)
    return TargetFactors(A=x.T @ x / len(x), G=y.T @ y / len(y), positions=len(x))


def test_rho_one_gives_back_w_and_the_edit_is_a_projection():
    torch.manual_seed(0)
    w = torch.randn(12, 8, dtype=torch.float64)
    basis = eigenbasis(random_factors(12, 8))
    torch.testing.assert_close(change_basis_and_mask(w, basis, select_by_mass(basis.lam, basis.mu, 1.0)), w,
                               rtol=0, atol=1e-12)
    mask = select_by_mass(basis.lam, basis.mu, 0.6)
    once = change_basis_and_mask(w, basis, mask)
    twice = change_basis_and_mask(once, basis, mask)
    torch.testing.assert_close(twice, once, rtol=0, atol=1e-12)
    assert not torch.allclose(once, w)


def factors_with_spectra(lam, mu, seed=0):
    g = torch.Generator().manual_seed(seed)
    u_g = torch.linalg.qr(torch.randn(len(lam), len(lam), generator=g, dtype=torch.float64))[0]
    u_a = torch.linalg.qr(torch.randn(len(mu), len(mu), generator=g, dtype=torch.float64))[0]
    return TargetFactors(A=u_a @ torch.diag(mu) @ u_a.T, G=u_g @ torch.diag(lam) @ u_g.T, positions=1)


def test_edited_weight_stays_full_rank_at_rho_point_six():
    """The kept set is a staircase, not a rectangle: with power-law spectra (as curvature
    spectra are) the top rows keep every column and W' keeps full rank with under a third
    of the components."""
    torch.manual_seed(1)
    w = torch.randn(64, 16, dtype=torch.float64)
    index = lambda n: torch.arange(1, n + 1, dtype=torch.float64)  # noqa: E731
    basis = eigenbasis(factors_with_spectra(index(64) ** -0.7, index(16) ** -0.3))
    mask = select_by_mass(basis.lam, basis.mu, 0.6)
    rows_kept = mask.sum(1)
    assert mask.sum() < mask.numel() / 3 and rows_kept.max() > rows_kept.min()  # not a rectangle
    assert torch.linalg.matrix_rank(change_basis_and_mask(w, basis, mask)) == 16


@pytest.mark.parametrize("seed", range(3))
def test_rank_of_the_edit_is_the_largest_square_inside_the_kept_staircase(seed):
    """Generic rank of C * M is the term rank of M (König: the smallest cover of its kept
    entries by rows and columns); for a staircase (row i keeps k_i columns) that is
    min over s of (s + #{i : k_i > s}). With steep spectra W' loses rank."""
    torch.manual_seed(seed)
    w = torch.randn(40, 24, dtype=torch.float64)
    basis = eigenbasis(random_factors(40, 24, seed=seed))
    for rho in (0.3, 0.6, 0.9):
        kept = select_by_mass(basis.lam, basis.mu, rho).sum(1)
        term_rank = min(s + int((kept > s).sum()) for s in range(25))
        mask = select_by_mass(basis.lam, basis.mu, rho)
        assert torch.linalg.matrix_rank(change_basis_and_mask(w, basis, mask)) == term_rank


def reference_edit(weight_oi, a, g, rho):
    """numpy float64: eigh, sort all products, keep the shortest prefix reaching rho."""
    mu, ua = np.linalg.eigh((a + a.T) / 2)
    lam, ug = np.linalg.eigh((g + g.T) / 2)
    mu, ua, lam, ug = np.clip(mu[::-1], 0, None), ua[:, ::-1], np.clip(lam[::-1], 0, None), ug[:, ::-1]
    prod = np.outer(lam, mu).ravel()
    order = np.argsort(-prod, kind="stable")
    k = int(np.searchsorted(np.cumsum(prod[order]), rho * prod.sum())) + 1
    mask = np.zeros(prod.size, bool)
    mask[order[:k]] = True
    return ug @ ((ug.T @ weight_oi @ ua) * mask.reshape(lam.size, mu.size)) @ ua.T


def test_edit_model_equals_independent_recomputation_and_undo_restores_bits(tmp_path):
    model = tiny_gpt2(dtype=torch.float32)
    factor_dir, targets = collected(tmp_path, model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from curvedit.kfac.factors import load_factors

    factors = load_factors(factor_dir)
    plan = EditPlan(rules=[EditRule("*.c_fc", rho=0.6), EditRule("*", rho=0.9)])
    applied = edit_model(model, targets, plan, factor_dir)
    assert (factor_dir / "eigenbasis.safetensors").is_file()
    for target in targets:
        rho = 0.6 if target.name.endswith("c_fc") else 0.9
        tf = factors.targets[target.name]
        expected = reference_edit(before[target.name + ".weight"].double().T.numpy(), tf.A.double().numpy(),
                                  tf.G.double().numpy(), rho)
        np.testing.assert_allclose(target.weight_oi().detach().double().numpy(), expected, rtol=1e-5, atol=1e-6)
    for name, tensor in model.state_dict().items():
        if not any(name == t.name + ".weight" for t in targets):
            assert torch.equal(tensor, before[name]), name
    stats = {s.name: s for s in applied.stats}
    assert stats["transformer.h.0.mlp.c_fc"].mass_kept >= 0.6
    applied.undo()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_cached_eigenbasis_is_reused_and_invalidated_when_factors_change(tmp_path):
    from curvedit.kfac.factors import load_factors, save_factors
    from curvedit.kfac.spectrum import EIGEN_FILE, cached_eigenbases

    model = tiny_gpt2(dtype=torch.float32)
    factor_dir, targets = collected(tmp_path, model)
    factors = load_factors(factor_dir)
    names = [t.name for t in targets]
    first = cached_eigenbases(factor_dir, factors.targets, names)
    stamp = (factor_dir / EIGEN_FILE).stat().st_mtime_ns
    again = cached_eigenbases(factor_dir, factors.targets, names)
    assert (factor_dir / EIGEN_FILE).stat().st_mtime_ns == stamp
    assert torch.equal(first[names[0]].U_G, again[names[0]].U_G)
    factors.targets[names[0]].A = factors.targets[names[0]].A * 2
    save_factors(factors, factor_dir)
    changed = cached_eigenbases(factor_dir, load_factors(factor_dir).targets, names)
    torch.testing.assert_close(changed[names[0]].mu, first[names[0]].mu * 2)


@pytest.mark.parametrize("method", ["lowest", "random"])
def test_controls_keep_as_many_components_as_kfac(tmp_path, method):
    model = tiny_gpt2(dtype=torch.float32)
    factor_dir, targets = collected(tmp_path, model)
    rules = [EditRule("*", keep_fraction=0.3)]
    kfac = edit_model(model, targets, EditPlan(rules), factor_dir)
    kfac.undo()
    control = edit_model(model, targets, EditPlan(rules, EditSettings(method=method, seed=1)), factor_dir)
    for k, c in zip(kfac.stats, control.stats):
        assert c.kept == k.kept == round(0.3 * k.total)
        assert c.mass_kept < k.mass_kept
    if method == "lowest":
        assert all(c.mass_kept < 0.05 for c in control.stats)


def test_svd_truncation_keeps_top_singular_values():
    torch.manual_seed(2)
    w = torch.randn(10, 6, dtype=torch.float64)
    same, kept, total, energy = svd_truncate(w, EditRule(rho=1.0))
    torch.testing.assert_close(same, w)
    assert (kept, total, energy) == (6, 6, pytest.approx(1.0))
    half, kept, _, energy = svd_truncate(w, EditRule(keep_fraction=0.5))
    s = torch.linalg.svdvals(w)
    assert kept == 3 and torch.linalg.matrix_rank(half) == 3
    assert energy == pytest.approx(float((s[:3] ** 2).sum() / (s ** 2).sum()))
    _, kept, _, energy = svd_truncate(w, EditRule(rho=0.8))
    assert energy >= 0.8 and float((s[: kept - 1] ** 2).sum() / (s ** 2).sum()) < 0.8


def test_bad_requests_are_refused(tmp_path):
    with pytest.raises(EditError, match="must be in"):
        EditRule(rho=1.5)
    with pytest.raises(EditError, match="exactly one"):
        EditRule(rho=0.5, keep_fraction=0.5)
    with pytest.raises(EditError, match="unknown method"):
        EditPlan([EditRule(rho=0.5)], EditSettings(method="magic"))
    assert set(METHODS) == {"kfac", "svd", "random", "lowest", "identity", "noise"}
    model = tiny_gpt2(dtype=torch.float32)
    factor_dir, targets = collected(tmp_path, model)
    other = select_targets(tiny_gpt2(seed=9, dtype=torch.float32), TargetSpec(preset="mlp"))
    with pytest.raises(FactorError, match="weights differ"):
        edit_model(model, other, EditPlan([EditRule(rho=0.5)]), factor_dir)
    with pytest.raises(EditError, match="no rule of the plan matches"):
        apply_edit(targets, EditPlan([EditRule('*.c_fc', rho=0.5)], EditSettings(method="svd")))
    # a failing plan leaves the model as it was
    assert all(torch.equal(t.weight_oi(), s.weight_oi()) for t, s in
               zip(targets, select_targets(model, TargetSpec(preset="mlp"))))
