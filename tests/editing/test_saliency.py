"""Saliency masses (lam_i mu_j C_ij^2) and the identity basis: the controls of the frontier."""

from __future__ import annotations

import pytest
import torch

from curvedit.editing.edit import EditError, EditPlan, EditRule, apply_edit, kfac_mask, saliency_masses
from curvedit.editing.settings import EditSettings
from curvedit.kfac.spectrum import Eigenbasis, identity_bases, sym_eigh
from curvedit.kfac.targets import TargetSpec, select_targets
from tests.tiny_models import tiny_gpt2


def random_basis(d_out: int, d_in: int, seed: int) -> Eigenbasis:
    g = torch.Generator().manual_seed(seed)

    def psd(d: int) -> torch.Tensor:
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        return q @ torch.diag(torch.rand(d, generator=g, dtype=torch.float64) + 0.05) @ q.T

    lam, u_g = sym_eigh(psd(d_out))
    mu, u_a = sym_eigh(psd(d_in))
    return Eigenbasis(lam, u_g, mu, u_a)


def test_saliency_keeps_the_components_of_highest_curvature_times_coefficient_squared():
    basis = random_basis(5, 4, 0)
    weight = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    coeffs = basis.U_G.T @ weight @ basis.U_A
    expected = torch.tensor([[float(basis.lam[i] * basis.mu[j] * coeffs[i, j] ** 2) for j in range(4)]
                             for i in range(5)], dtype=torch.float64)
    assert torch.allclose(saliency_masses(basis, weight), expected)
    mask = kfac_mask(basis, EditRule(keep_fraction=0.25), "saliency", weight_oi=weight)
    top5 = set(torch.argsort(expected.flatten(), descending=True)[:5].tolist())
    assert set(torch.nonzero(mask.flatten()).flatten().tolist()) == top5
    with pytest.raises(EditError, match="give the weight"):
        kfac_mask(basis, EditRule(keep_fraction=0.25), "saliency")


def test_the_identity_basis_with_saliency_is_magnitude_pruning():
    model = tiny_gpt2(vocab=11)
    targets = select_targets(model, TargetSpec(preset="mlp-in"))
    before = {t.name: t.weight_oi().clone() for t in targets}
    applied = apply_edit(targets, EditPlan([EditRule(keep_fraction=0.3)],
                                           EditSettings(method="identity", masses="saliency")),
                         identity_bases(targets))
    for t in targets:
        w, edited = before[t.name], t.weight_oi()
        kept = round(0.3 * w.numel())
        threshold = w.abs().flatten().sort(descending=True).values[kept - 1]
        assert int((edited != 0).sum()) == kept
        assert torch.equal(edited[edited != 0], w[edited != 0]) and bool((w[edited != 0].abs() >= threshold).all())
    applied.undo()
    assert all(torch.equal(t.weight_oi(), before[t.name]) for t in targets)


def test_identity_needs_saliency_masses():
    with pytest.raises(EditError, match="saliency"):
        EditPlan([EditRule(keep_fraction=0.3)], EditSettings(method="identity"))


def test_cli_magnitude_pruning_needs_no_factors(tmp_path, lm_dir):
    import json

    from typer.testing import CliRunner

    from curvedit.cli import app

    out = tmp_path / "pruned"
    result = CliRunner().invoke(app, ["edit", "--model", str(lm_dir), "--method", "identity", "--masses", "saliency",
                                      "--keep-fraction", "0.5", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "curvedit-edit.json").read_text())
    assert manifest["plan"]["method"] == "identity" and manifest["plan"]["masses"] == "saliency"


def test_the_noise_control_moves_the_weight_as_far_as_the_edit_inside_the_removed_block_only():
    from curvedit.editing.edit import change_basis_and_mask, noise_in_block

    basis = random_basis(6, 5, 2)
    weight = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    mask = kfac_mask(basis, EditRule(rho=0.7))
    edited = change_basis_and_mask(weight, basis, mask)
    noisy = noise_in_block(weight, basis, mask, torch.Generator().manual_seed(0))
    assert float(torch.linalg.norm(noisy - weight)) == pytest.approx(float(torch.linalg.norm(edited - weight)))
    change = basis.U_G.T @ (noisy - weight) @ basis.U_A
    assert float(change[mask].abs().max()) < 1e-12 and float(change[~mask].abs().max()) > 0
    again = noise_in_block(weight, basis, mask, torch.Generator().manual_seed(0))
    other = noise_in_block(weight, basis, mask, torch.Generator().manual_seed(1))
    assert torch.equal(again, noisy) and not torch.allclose(other, noisy)


def test_cli_noise_control(tmp_path, lm_dir, text_jsonl):
    import json

    from typer.testing import CliRunner

    from curvedit.cli import app

    factors = tmp_path / "factors"
    assert CliRunner().invoke(app, ["collect", "--model", str(lm_dir), "--data", str(text_jsonl), "--out",
                                    str(factors), "--seq-len", "16", "--no-progress"]).exit_code == 0
    result = CliRunner().invoke(app, ["edit", "--model", str(lm_dir), "--factors", str(factors), "--method", "noise",
                                      "--rho", "0.6", "--seed", "3", "--out", str(tmp_path / "noisy"), "--no-progress"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "noisy" / "curvedit-edit.json").read_text())
    assert manifest["plan"]["method"] == "noise" and manifest["plan"]["seed"] == 3


def test_side_restricted_edits_keep_whole_top_eigendirections_of_one_side():
    from curvedit.editing.edit import shaped_mask

    basis = random_basis(6, 5, 4)
    g_side = shaped_mask(basis, EditRule(keep_fraction=0.5, side="G"))
    assert g_side[:3].all() and not g_side[3:].any()
    a_side = shaped_mask(basis, EditRule(rho=0.6, side="A"))
    cumulative = torch.cumsum(basis.mu, 0) / basis.mu.sum()
    k = int((cumulative < 0.6 - 1e-12).sum()) + 1  # the fewest top A directions reaching 60% of the mass
    assert a_side[:, :k].all() and not a_side[:, k:].any()


def test_block_deletion_removes_the_flattest_block_only():
    from curvedit.editing.edit import shaped_mask
    from curvedit.kfac.spectrum import SelectionError

    basis = random_basis(6, 5, 5)
    mask = shaped_mask(basis, EditRule(block=(0.5, 0.6)))
    assert not mask[3:, 2:].any() and mask[:3].all() and mask[:, :2].all()
    with pytest.raises(SelectionError, match="removes every component"):
        shaped_mask(basis, EditRule(block=(1.0, 1.0)))
    with pytest.raises(EditError, match="takes no rho"):
        EditRule(block=(0.5, 0.5), rho=0.5)
    with pytest.raises(EditError, match="need method kfac"):
        EditPlan([EditRule(block=(0.5, 0.5))], EditSettings(method="svd"))
    with pytest.raises(EditError, match="side must be"):
        EditRule(keep_fraction=0.5, side="X")


def test_cli_block_and_side_edits(tmp_path, lm_dir, text_jsonl):
    import json

    from typer.testing import CliRunner

    from curvedit.cli import app

    factors = tmp_path / "factors"
    assert CliRunner().invoke(app, ["collect", "--model", str(lm_dir), "--data", str(text_jsonl), "--out",
                                    str(factors), "--seq-len", "16", "--no-progress"]).exit_code == 0
    base = ["edit", "--model", str(lm_dir), "--factors", str(factors), "--no-progress"]
    block = CliRunner().invoke(app, base + ["--block", "0.6x0.6", "--out", str(tmp_path / "b")])
    assert block.exit_code == 0, block.output
    rule = json.loads((tmp_path / "b" / "curvedit-edit.json").read_text())["plan"]["rules"][0]
    assert rule["block"] == [0.6, 0.6]
    side = CliRunner().invoke(app, base + ["--side", "A", "--keep-fraction", "0.5", "--out", str(tmp_path / "s")])
    assert side.exit_code == 0, side.output
    bad = CliRunner().invoke(app, base + ["--block", "0.6x0.6", "--rho", "0.5", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--block PxQ is the whole amount" in bad.output
