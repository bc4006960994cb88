"""Eigenvalue-corrected masses (EK-FAC) against references computed another way, in float64.

The reference runs each sequence alone, keeps every position's output gradient g and input
x, forms the per-position gradient g x^T explicitly, rotates it into the eigenbasis and
averages its squared entries. When g and x are independent the masses are the K-FAC
products lam_i * mu_j exactly.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from curvedit.cli import app
from curvedit.data import pad_batch
from curvedit.editing.edit import EditError, EditPlan, EditRule, apply_edit
from curvedit.editing.settings import EditSettings
from curvedit.kfac.collect import CollectOptions, collect_factors
from curvedit.kfac.eigencorrect import collect_eigencorrections, eigencorrect_factors, eigencorrection_sum
from curvedit.kfac.factors import FactorError, load_factors, save_factors
from curvedit.kfac.spectrum import (
    Eigenbasis,
    SelectionError,
    basis_sha256,
    eigenbasis,
    load_bases,
    select_by_count,
    select_by_mass,
    select_by_masses,
)
from curvedit.kfac.targets import TargetSpec, select_targets
from tests.helpers import target_io
from tests.tiny_models import char_model_dir, tiny_gpt2, tiny_olmo2

SEQS = [[1, 2, 3, 4, 5], [3, 4, 5, 6, 7, 8, 9], [2, 2], [5, 1, 4]]


def gold() -> CollectOptions:
    return CollectOptions(label_mode="gold", accumulate_dtype="float64", progress=False)


def brute_force_s(model, targets, bases, seqs):
    """mean over positions of (U_G^T (g x^T) U_A)^2, one sequence at a time, gold labels."""
    sums, count = {t.name: 0 for t in targets}, 0
    for seq in seqs:
        ids = torch.tensor([seq])
        io = target_io(model, targets, ids, lambda logits, ids=ids: F.cross_entropy(logits[:-1], ids[0, 1:],
                                                                               reduction="sum"))
        n = len(seq) - 1
        count += n
        for name, (x, g) in io.items():
            basis = bases[name]
            for position in range(n):
                per_position = torch.outer(g[position], x[position])  # g x^T, (d_out, d_in)
                sums[name] = sums[name] + (basis.U_G.T @ per_position @ basis.U_A).square()
    return {name: total / count for name, total in sums.items()}


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_olmo2], ids=["gpt2-conv1d", "olmo2-linear"])
@pytest.mark.parametrize("batch_size,side", [(1, "right"), (3, "left")])
def test_masses_equal_per_position_brute_force(make_model, batch_size, side):
    model = make_model()
    targets = select_targets(model, TargetSpec(preset="mlp"))
    batches = [pad_batch(SEQS[i:i + batch_size], 0, side) for i in range(0, len(SEQS), batch_size)]
    factors = collect_factors(model, batches, targets, options=gold())
    bases = {name: eigenbasis(tf) for name, tf in factors.targets.items()}
    corrected = collect_eigencorrections(model, batches, targets, bases, options=gold())
    ref_model = make_model()
    reference = brute_force_s(ref_model, select_targets(ref_model, TargetSpec(preset="mlp")), bases, SEQS)
    for target in targets:
        s_oi, positions = corrected[target.name]
        assert positions == sum(len(s) - 1 for s in SEQS)
        assert torch.allclose(s_oi, reference[target.name], rtol=1e-9, atol=1e-14), target.name


def test_independent_inputs_and_gradients_give_the_kfac_products():
    # every (x_k, g_l) pair once: x and g are independent over the positions, so s_ij = lam_i * mu_j exactly
    torch.manual_seed(0)
    xs, gs = torch.randn(5, 6, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    x_ni = xs.repeat(4, 1)
    g_no = gs.repeat_interleave(5, dim=0)
    a_ii, g_oo = x_ni.T @ x_ni / 20, g_no.T @ g_no / 20
    lam, u_g = torch.linalg.eigh(g_oo)
    mu, u_a = torch.linalg.eigh(a_ii)
    basis = Eigenbasis(lam=lam.flip(0), U_G=u_g.flip(1), mu=mu.flip(0), U_A=u_a.flip(1))
    s_oi = eigencorrection_sum(g_no, x_ni, basis) / 20
    assert torch.allclose(s_oi, torch.outer(basis.lam, basis.mu), rtol=1e-10, atol=1e-12)


def test_selection_by_general_masses():
    masses = torch.tensor([[5.0, 1.0, 0.5], [3.0, 2.0, 0.0]])
    assert select_by_masses(masses, keep_fraction=0.5).tolist() == [[True, False, False], [True, True, False]]
    # rho 0.7 of 11.5 = 8.05: 5 + 3 reaches 8 < 8.05, so 2 (the third largest) is needed too
    assert select_by_masses(masses, rho=0.7).tolist() == [[True, False, False], [True, True, False]]
    assert select_by_masses(masses, rho=0.6).tolist() == [[True, False, False], [True, False, False]]
    assert select_by_masses(masses, rho=1.0).all()
    with pytest.raises(SelectionError, match="exactly one"):
        select_by_masses(masses, rho=0.5, keep_fraction=0.5)
    with pytest.raises(SelectionError, match="non-negative"):
        select_by_masses(-masses, rho=0.5)
    # on rank-one masses it is the K-FAC selection
    lam, mu = torch.rand(7, dtype=torch.float64).sort(descending=True).values, torch.rand(9).double().sort(
        descending=True).values
    products = torch.outer(lam, mu)
    for rho in (0.3, 0.8):
        assert torch.equal(select_by_masses(products, rho=rho), select_by_mass(lam, mu, rho))
    assert torch.equal(select_by_masses(products, keep_fraction=0.4), select_by_count(lam, mu, 0.4))


@pytest.fixture
def corrected_dir(tmp_path):
    model = tiny_olmo2()
    targets = select_targets(model, TargetSpec(preset="mlp"))
    batches = [pad_batch(SEQS[i:i + 2], 0, "right") for i in range(0, len(SEQS), 2)]
    save_factors(collect_factors(model, batches, targets, options=gold()), tmp_path / "f")
    eigencorrect_factors(model, batches, targets, tmp_path / "f", options=gold())
    return model, targets, tmp_path / "f"


def test_factor_file_keeps_the_masses_and_the_basis_they_belong_to(corrected_dir):
    model, targets, folder = corrected_dir
    meta = json.loads((folder / "factors.json").read_text())
    assert meta["format_version"] == 2 and meta["collection"]["eigencorrected"]["seed"] == 0
    factors = load_factors(folder)
    bases = load_bases(targets, folder)
    for target in targets:
        tf = factors.targets[target.name]
        assert tf.S.shape == target.shape_oi and tf.S_positions == tf.positions
        assert tf.S_basis_sha256 == basis_sha256(bases[target.name])
        assert torch.equal(bases[target.name].S, tf.S)
    # a basis recomputed differently (another machine's eigh, say) is refused
    cache = folder / "eigenbasis.safetensors"
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(cache))
    with safe_open(str(cache), framework="pt") as handle:
        metadata = handle.metadata()
    name = targets[0].name
    tensors[f"{name}.U_A"] = -tensors[f"{name}.U_A"]
    save_file(tensors, str(cache), metadata=metadata)
    with pytest.raises(FactorError, match="another eigenbasis"):
        load_bases(targets, folder)


def test_format_version_1_files_still_load(corrected_dir, tmp_path):
    model, targets, folder = corrected_dir
    factors = load_factors(folder)
    for tf in factors.targets.values():
        tf.S = None
    save_factors(factors, tmp_path / "v1")
    for path in (tmp_path / "v1" / "factors.json",):
        meta = json.loads(path.read_text())
        meta["format_version"] = 1
        path.write_text(json.dumps(meta))
    from safetensors.torch import load_file

    from curvedit.io import write_safetensors

    tensors = load_file(str(tmp_path / "v1" / "factors.safetensors"))
    write_safetensors(tmp_path / "v1" / "factors.safetensors", tensors, metadata={"format": "curvedit-factors"})
    old = load_factors(tmp_path / "v1")
    assert all(tf.S is None for tf in old.targets.values())


def test_ekfac_edit_ranks_by_the_stored_masses(corrected_dir):
    model, targets, folder = corrected_dir
    bases = load_bases(targets, folder)
    before = [t.weight_oi().clone() for t in targets]
    applied = apply_edit(targets, EditPlan([EditRule(keep_fraction=0.5)], EditSettings(masses="ekfac")), bases)
    for target, stats, weight in zip(targets, applied.stats, before):
        basis = bases[target.name]
        mask = select_by_masses(basis.S, keep_fraction=0.5)
        expected = basis.U_G @ ((basis.U_G.T @ weight @ basis.U_A) * mask) @ basis.U_A.T
        assert torch.allclose(target.weight_oi(), expected.to(weight), atol=1e-12)
        assert stats.mass_kept == pytest.approx(float(basis.S[mask].sum() / basis.S.sum()))
    applied.undo()
    without = {name: Eigenbasis(b.lam, b.U_G, b.mu, b.U_A) for name, b in bases.items()}
    with pytest.raises(EditError, match="collect --eigencorrect"):
        apply_edit(targets, EditPlan([EditRule(keep_fraction=0.5)], EditSettings(masses="ekfac")), without)
    with pytest.raises(EditError, match="unknown masses"):
        EditPlan([EditRule(keep_fraction=0.5)], EditSettings(masses="fisher"))


def test_cli_collect_eigencorrect_then_edit_with_ekfac_masses(tmp_path):
    model = char_model_dir(tmp_path)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": "abcdefgh" * 3 + t}) + "\n" for t in "abcdefgh"))
    runner = CliRunner()
    done = runner.invoke(app, ["collect", "--model", str(model), "--data", str(tmp_path / "c.jsonl"),
                               "--out", str(tmp_path / "f"), "--seq-len", "16", "--eigencorrect", "--no-progress"])
    assert done.exit_code == 0, done.output
    assert all(tf.S is not None for tf in load_factors(tmp_path / "f").targets.values())
    edited = runner.invoke(app, ["edit", "--model", str(model), "--factors", str(tmp_path / "f"),
                                 "--keep-fraction", "0.5", "--masses", "ekfac", "--out", str(tmp_path / "e"),
                                 "--no-progress"])
    assert edited.exit_code == 0, edited.output
    manifest = json.loads((tmp_path / "e" / "curvedit-edit.json").read_text())
    assert manifest["plan"]["masses"] == "ekfac"
