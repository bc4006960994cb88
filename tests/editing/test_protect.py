"""Protected edits (`edit --protect`): the protect population's curvature in the general
eigenbasis, united with the general selection."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from curvedit.cli import app
from curvedit.editing.edit import EditRule, change_basis_and_mask, kfac_mask
from curvedit.editing.protect import protect_mask, protect_masses
from curvedit.kfac.spectrum import Eigenbasis, select_by_mass, sym_eigh


def random_psd(d: int, seed: int) -> torch.Tensor:
    """A random PSD matrix with random eigenvalues (no exact ties among their products)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.rand(d, generator=g, dtype=torch.float64) + 0.05) @ q.T


def basis_of(g_oo: torch.Tensor, a_ii: torch.Tensor) -> Eigenbasis:
    lam, u_g = sym_eigh(g_oo)
    mu, u_a = sym_eigh(a_ii)
    return Eigenbasis(lam, u_g, mu, u_a)


def test_protect_masses_are_the_protect_factors_along_the_general_eigenvectors():
    basis = basis_of(random_psd(5, 0), random_psd(4, 1))
    g_p, a_p = random_psd(5, 2), random_psd(4, 3)
    p, q = protect_masses(basis, g_p, a_p)
    for i in range(5):
        u = basis.U_G[:, i]
        assert float(p[i]) == pytest.approx(float(sum(u[a] * g_p[a, b] * u[b] for a in range(5) for b in range(5))))
    for j in range(4):
        v = basis.U_A[:, j]
        assert float(q[j]) == pytest.approx(float(sum(v[a] * a_p[a, b] * v[b] for a in range(4) for b in range(4))))


def test_protect_mask_ranks_unsorted_products_like_sorting_every_product():
    p, q = torch.tensor([0.1, 3.0, 0.5, 2.0], dtype=torch.float64), torch.tensor([1.0, 0.2, 4.0], dtype=torch.float64)
    products = (p[:, None] * q[None, :]).flatten()
    for rho in (0.3, 0.6, 0.9):
        order = torch.argsort(products, descending=True)
        need, total, kept = rho * float(products.sum()), 0.0, torch.zeros(12, dtype=torch.bool)
        for k in order.tolist():
            if total >= need:
                break
            kept[k], total = True, total + float(products[k])
        assert torch.equal(protect_mask(p, q, rho, None), kept.view(4, 3))
    assert int(protect_mask(p, q, None, 0.5).sum()) == 6


@pytest.mark.parametrize("rule", [EditRule(rho=0.6), EditRule(keep_fraction=0.3)])
def test_protecting_with_the_general_factors_themselves_is_the_plain_edit(rule):
    g_oo, a_ii = random_psd(6, 4), random_psd(5, 5)
    plain = kfac_mask(basis_of(g_oo, a_ii), rule)
    protected = basis_of(g_oo, a_ii)
    protected.protect = protect_masses(protected, g_oo, a_ii)
    assert torch.equal(kfac_mask(protected, rule), plain)


def test_a_capability_in_directions_the_general_data_leaves_flat_survives_only_the_protected_edit():
    d_in, d_out = 6, 4
    a_general = torch.diag(torch.tensor([5.0, 4, 3, 2, 1, 1e-4], dtype=torch.float64))  # x_5 barely used in general
    a_capability = torch.zeros(d_in, d_in, dtype=torch.float64)
    a_capability[5, 5] = 1.0  # the capability reads only x_5
    g_oo = torch.eye(d_out, dtype=torch.float64) + 0.1 * random_psd(d_out, 6)
    weight = torch.randn(d_out, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    x = torch.zeros(d_in, dtype=torch.float64)
    x[5] = 1.0
    basis = basis_of(g_oo, a_general)
    rule = EditRule(rho=0.9)
    plain = change_basis_and_mask(weight, basis, kfac_mask(basis, rule))
    assert torch.linalg.norm(plain @ x) < 1e-6 * torch.linalg.norm(weight @ x)  # the plain edit drops it
    basis.protect = protect_masses(basis, g_oo, a_capability)
    protected = change_basis_and_mask(weight, basis, kfac_mask(basis, rule))
    assert torch.allclose(protected @ x, weight @ x, atol=1e-10)  # the protected edit keeps it exactly
    general_x = torch.tensor([1.0, -1, 0.5, 0, 0, 0], dtype=torch.float64)
    assert torch.allclose(protected @ general_x, plain @ general_x)  # and changes nothing else
    assert bool(select_by_mass(basis.lam, basis.mu, 0.9).sum()) and kfac_mask(basis, rule).sum() > select_by_mass(
        basis.lam, basis.mu, 0.9).sum()


def test_cli_edit_protect_with_the_general_factors_writes_the_plain_edit(tmp_path, lm_dir, text_jsonl):
    from safetensors.torch import load_file

    runner = CliRunner()
    factors = tmp_path / "factors"
    assert runner.invoke(app, ["collect", "--model", str(lm_dir), "--data", str(text_jsonl), "--out", str(factors),
                               "--seq-len", "16", "--no-progress"]).exit_code == 0
    plain, protected = tmp_path / "plain", tmp_path / "protected"
    base = ["edit", "--model", str(lm_dir), "--factors", str(factors), "--rho", "0.6", "--no-progress"]
    assert runner.invoke(app, base + ["--out", str(plain)]).exit_code == 0
    result = runner.invoke(app, base + ["--out", str(protected), "--protect", str(factors)])
    assert result.exit_code == 0, result.output
    a, b = load_file(str(plain / "model.safetensors")), load_file(str(protected / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    manifest = json.loads((protected / "curvedit-edit.json").read_text())
    assert manifest["protect"]["factors"] == str(factors) and manifest["protect"]["amount"] == "the edit's own"
    stronger = runner.invoke(app, base + ["--out", str(tmp_path / "p2"), "--protect", str(factors),
                                          "--protect-rho", "0.95"])
    assert stronger.exit_code == 0, stronger.output
    kept = json.loads((tmp_path / "p2" / "curvedit-edit.json").read_text())["targets"]
    plain_kept = json.loads((plain / "curvedit-edit.json").read_text())["targets"]
    assert sum(t["kept"] for t in kept.values()) > sum(t["kept"] for t in plain_kept.values())
