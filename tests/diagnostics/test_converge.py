"""How much data the factors need: the captured-mass comparison against a Kronecker brute force,
and the convergence run through the API and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from curvedit.cli import app
from curvedit.diagnostics.converge import (
    ConvergeOptions,
    captured_mass,
    compare_factors,
    prefix_by_tokens,
    run_convergence,
)
from curvedit.editing.edit import EditRule, kfac_mask
from curvedit.kfac.factors import FactorError, FactorSet, TargetFactors
from curvedit.kfac.spectrum import eigenbasis
from curvedit.kfac.targets import TargetSpec, select_targets
from tests.tiny_models import char_model_dir, tiny_gpt2


def random_factors(seed: int, d_out: int = 3, d_in: int = 4) -> TargetFactors:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(50, d_in, generator=generator, dtype=torch.float64)
    g = torch.randn(50, d_out, generator=generator, dtype=torch.float64) * torch.arange(1, d_out + 1)
    return TargetFactors(A=x.T @ x / 50, G=g.T @ g / 50, positions=50)


@pytest.mark.parametrize("rule", [EditRule(keep_fraction=0.5), EditRule(rho=0.8)], ids=["count", "mass"])
def test_captured_mass_equals_a_kronecker_brute_force(rule):
    a, b = random_factors(0), random_factors(1)
    basis_a, basis_b = eigenbasis(a), eigenbasis(b)
    fisher_b = torch.kron(b.G, b.A)  # the curvature of b on vec(W), row-major
    kept = kfac_mask(basis_a, rule)
    captured = sum(float(torch.kron(basis_a.U_G[:, i], basis_a.U_A[:, j]) @ fisher_b
                         @ torch.kron(basis_a.U_G[:, i], basis_a.U_A[:, j]))
                   for i, j in kept.nonzero().tolist())
    own_kept = kfac_mask(basis_b, rule)
    own = sum(float(torch.kron(basis_b.U_G[:, i], basis_b.U_A[:, j]) @ fisher_b
                    @ torch.kron(basis_b.U_G[:, i], basis_b.U_A[:, j])) for i, j in own_kept.nonzero().tolist())
    assert captured_mass(basis_a, b, basis_b, rule) == pytest.approx(captured / own, rel=1e-10)
    assert captured_mass(basis_b, b, basis_b, rule) == pytest.approx(1.0)
    assert captured_mass(basis_a, b, basis_b, rule) < 1.0


def test_compare_factors_refuses_other_models():
    a = FactorSet({"t": random_factors(0)}, model={"weights_hash": "x"})
    b = FactorSet({"t": random_factors(1)}, model={"weights_hash": "y"})
    with pytest.raises(FactorError, match="different model weights"):
        compare_factors(a, b, EditRule(keep_fraction=0.5))
    assert compare_factors(a, FactorSet(b.targets, model={"weights_hash": "x"}), EditRule(keep_fraction=0.5)).mean < 1


def test_prefix_by_tokens_cuts_the_last_sequence():
    assert prefix_by_tokens([[1, 2, 3], [4, 5, 6], [7]], 5) == [[1, 2, 3], [4, 5]]
    assert prefix_by_tokens([[1, 2]], 10) == [[1, 2]]


def test_convergence_run_compares_every_budget_with_the_last(tmp_path):
    model = tiny_gpt2()
    targets = select_targets(model, TargetSpec(preset="mlp"))
    generator = torch.Generator().manual_seed(0)
    sequences = torch.randint(1, 11, (40, 8), generator=generator).tolist()
    options = ConvergeOptions(budgets=(40, 120, 320), rule=EditRule(keep_fraction=0.5), progress=False)
    result = run_convergence(model, sequences, targets, tmp_path, options,
                             evaluate=lambda m: {"loose": 0.0, "perplexity": 1.0})
    assert [r["tokens"] for r in result["rows"]] == [40, 120, 320]
    assert result["rows"][-1]["captured"] == pytest.approx(1.0)
    assert all(0 < r["captured"] <= 1.0 + 1e-9 for r in result["rows"])
    assert 0 < result["gold"]["captured_gold_in_sampled"] < 1.0
    assert {p.name for p in tmp_path.iterdir()} == {"tokens-40", "tokens-120", "tokens-320", "gold-320"}
    again = run_convergence(model, sequences, targets, tmp_path, options)  # factors read back, not recollected
    assert [r["captured"] for r in again["rows"]] == [r["captured"] for r in result["rows"]]
    with pytest.raises(FactorError, match="fewer than the largest budget"):
        run_convergence(model, sequences, targets, tmp_path, ConvergeOptions(budgets=(10_000,), progress=False))


def test_a_rerun_with_another_model_or_data_recollects_instead_of_reusing_the_folders(tmp_path, monkeypatch):
    import curvedit.diagnostics.converge

    model, other = tiny_gpt2(seed=0), tiny_gpt2(seed=1)
    sequences = torch.randint(1, 11, (40, 8), generator=torch.Generator().manual_seed(0)).tolist()
    options = ConvergeOptions(budgets=(40, 120), rule=EditRule(keep_fraction=0.5), gold=False, progress=False)
    calls = []
    real = curvedit.diagnostics.converge.collect_factors
    monkeypatch.setattr(curvedit.diagnostics.converge, "collect_factors",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    first = run_convergence(model, sequences, select_targets(model, TargetSpec(preset="mlp")), tmp_path, options)
    assert len(calls) == 2
    run_convergence(model, sequences, select_targets(model, TargetSpec(preset="mlp")), tmp_path, options)
    assert len(calls) == 2  # the same run: read back
    second = run_convergence(other, sequences, select_targets(other, TargetSpec(preset="mlp")), tmp_path, options)
    assert len(calls) == 4 and second["rows"][0]["captured"] != first["rows"][0]["captured"]
    shuffled = sequences[::-1]
    run_convergence(other, shuffled, select_targets(other, TargetSpec(preset="mlp")), tmp_path, options)
    assert len(calls) == 6  # other data: collected anew


def test_cli_converge_both_modes(tmp_path):
    char_model_dir(tmp_path)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": "abcdefgh"[i:] + "hgfedcba"[:i] * 3}) + "\n"
                                              for i in range(8)) * 4)
    runner = CliRunner()
    done = runner.invoke(app, ["converge", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "c.jsonl"),
                               "--tokens", "50,200", "--seq-len", "16", "--out", str(tmp_path / "conv"),
                               "--no-progress"])
    assert done.exit_code == 0, done.output
    result = json.loads((tmp_path / "conv" / "converge.json").read_text())
    assert [r["tokens"] for r in result["rows"]] == [50, 200] and (tmp_path / "conv" / "converge.png").is_file()
    compared = runner.invoke(app, ["converge", "--factors-a", str(tmp_path / "conv" / "tokens-50"), "--factors-b",
                                   str(tmp_path / "conv" / "tokens-200"), "--out", str(tmp_path / "ab.json")])
    assert compared.exit_code == 0, compared.output
    assert json.loads((tmp_path / "ab.json").read_text())["mean"] == pytest.approx(result["rows"][0]["captured"])
