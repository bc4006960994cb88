"""The coherent step (`curvedit.editing.step`, `edit --step-from`): its gradient against per-window
autograd, its place in the flat block, its norm, and a toy where a shared direction carries
two memorized sets."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from curvedit.cli import app
from curvedit.editing.edit import EditRule, change_basis_and_mask, kfac_mask
from curvedit.editing.step import StepError, apply_step, forget_gradients, step_directions, step_within_budget
from curvedit.evaluate.windows import Window
from curvedit.kfac.spectrum import Eigenbasis
from curvedit.kfac.targets import Target, TargetSpec, select_targets
from tests.helpers import factors_and_windows
from tests.tiny_models import tiny_gpt2


def random_basis(d_out: int, d_in: int, seed: int) -> Eigenbasis:
    g = torch.Generator().manual_seed(seed)
    u_g, _ = torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=torch.float64))
    u_a, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))
    lam = torch.sort(torch.rand(d_out, generator=g, dtype=torch.float64) + 0.01, descending=True).values
    mu = torch.sort(torch.rand(d_in, generator=g, dtype=torch.float64) + 0.01, descending=True).values
    return Eigenbasis(lam=lam, U_G=u_g, mu=mu, U_A=u_a)


WINDOWS = [Window([1, 2, 3], [4, 5]), Window([6, 2], [7, 8, 9]), Window([3, 3, 1, 4], [2])]


def test_the_forget_gradient_is_the_sum_of_per_window_suffix_loss_gradients():
    model = tiny_gpt2(n_layer=2)
    targets = select_targets(model, TargetSpec(preset="mlp"))
    got = forget_gradients(model, WINDOWS, targets, pad_id=0, batch_size=2)  # padded batches of two
    expected = {t.name: torch.zeros(t.shape_oi, dtype=torch.float64) for t in targets}
    for w in WINDOWS:  # one window at a time, unpadded: -log p of each suffix token, summed
        ids = torch.tensor([w.prefix_ids + w.suffix_ids])
        logp = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)
        first = len(w.prefix_ids)
        loss = -sum(logp[first - 1 + k, token] for k, token in enumerate(w.suffix_ids))
        grads = torch.autograd.grad(loss, [t.module.weight for t in targets])
        for t, grad in zip(targets, grads):
            expected[t.name] += grad.T if t.transposed else grad  # GPT-2's Conv1D stores (d_in, d_out)
    for t in targets:
        torch.testing.assert_close(got[t.name], expected[t.name], rtol=1e-9, atol=1e-12)
        assert t.module.weight.grad is None
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_the_step_lies_in_the_flat_block_with_unit_norm_and_the_deletion_s_scale():
    model = tiny_gpt2(n_layer=2)
    targets = select_targets(model, TargetSpec(preset="mlp"))
    bases = {t.name: random_basis(*t.shape_oi, seed=i) for i, t in enumerate(targets)}
    g = torch.Generator().manual_seed(5)
    grads = {t.name: torch.randn(t.shape_oi, generator=g, dtype=torch.float64) for t in targets}
    block = EditRule(keep_fraction=0.6)
    step = step_directions(grads, targets, bases, block)
    assert sum(float((d ** 2).sum()) for d in step.directions.values()) == pytest.approx(1.0)
    deleted_sq = 0.0
    for t in targets:
        basis = bases[t.name]
        kept = kfac_mask(basis, block)
        coeffs = basis.U_G.T @ step.directions[t.name] @ basis.U_A
        assert float(coeffs[kept].abs().max()) < 1e-12  # nothing outside the block
        grad_coeffs = basis.U_G.T @ grads[t.name] @ basis.U_A
        ratio = coeffs[~kept] / grad_coeffs[~kept]  # inside it: the gradient's own coefficients, one scale
        torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])))
        weight = t.weight_oi().detach().double()
        deleted_sq += float(((weight - change_basis_and_mask(weight, basis, kept)) ** 2).sum())  # the edit's path
        assert step.block_sizes[t.name] == int((~kept).sum())
    assert step.deletion_norm == pytest.approx(deleted_sq ** 0.5)


def test_norm_zero_is_the_identity_and_undo_restores_bit_for_bit():
    model = tiny_gpt2(n_layer=1)
    targets = select_targets(model, TargetSpec(preset="mlp"))
    bases = {t.name: random_basis(*t.shape_oi, seed=i) for i, t in enumerate(targets)}
    grads = {t.name: torch.ones(t.shape_oi, dtype=torch.float64) for t in targets}
    step = step_directions(grads, targets, bases, EditRule(rho=0.5))
    before = [t.module.weight.detach().clone() for t in targets]
    apply_step(targets, step, 0.0)
    assert all(torch.equal(t.module.weight, b) for t, b in zip(targets, before))
    applied = apply_step(targets, step, 0.3)
    moved = sum(float(((t.weight_oi().detach() - (b.T if t.transposed else b)) ** 2).sum())
                for t, b in zip(targets, before))
    assert moved ** 0.5 == pytest.approx(0.3)  # one step of that Frobenius norm over all targets
    applied.undo()
    assert all(torch.equal(t.module.weight, b) for t, b in zip(targets, before))
    with pytest.raises(StepError, match="finite number >= 0"):
        apply_step(targets, step, -1.0)
    with pytest.raises(StepError, match="nothing in the flat block"):
        step_directions({k: torch.zeros_like(v) for k, v in grads.items()}, targets, bases, EditRule(rho=0.5))


def test_a_step_from_half_of_a_memorized_set_removes_the_other_half_and_spares_general_inputs():
    # y = W x. General inputs span e0..e5 (high input curvature); every memorized input is v = e6 plus a little
    # of e7, and W maps v to the memorized output u: W = W_general + 3 u v^T. Its score is u^T W x.
    d = 8
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(d, d, bias=False).double()
    general = torch.zeros(200, d, dtype=torch.float64)
    general[:, :6] = torch.randn(200, 6, generator=g, dtype=torch.float64)
    u, v = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    u[0], v[6] = 1.0, 1.0
    with torch.no_grad():
        layer.weight.copy_(torch.randn(d, d, generator=g, dtype=torch.float64) * 0.1)
        layer.weight[:, 6:] = 0
        layer.weight += 3 * torch.outer(u, v)
    memorized = v + 0.3 * torch.randn(20, d, generator=g, dtype=torch.float64) * (torch.arange(d) == 7)
    tune, heldout = memorized[:10], memorized[10:]
    cov_in = (general.T @ general + memorized.T @ memorized * 1e-3) / 200
    mu, u_a = torch.linalg.eigh(cov_in)
    basis = Eigenbasis(lam=torch.ones(d, dtype=torch.float64), U_G=torch.eye(d, dtype=torch.float64),
                       mu=mu.flip(0), U_A=u_a.flip(1))
    target = Target(name="layer", module=layer, layer=None)
    grad = -torch.outer(u, tune.sum(0))  # d/dW of the forget loss -sum_k u^T W x_k (its score, negated)
    step = step_directions({"layer": grad}, [target], {"layer": basis}, EditRule(keep_fraction=0.75))

    def score(x: torch.Tensor) -> torch.Tensor:
        return layer(x) @ u

    general_before, held_before = layer(general).detach(), score(heldout).mean().item()
    apply_step([target], step, 3.0)
    assert held_before == pytest.approx(3.0, abs=0.01) and score(heldout).mean().item() < 0.1  # held-out gone
    torch.testing.assert_close(layer(general).detach(), general_before, atol=1e-9, rtol=0)  # general untouched


def test_step_within_budget_keeps_the_perplexity_and_leaves_the_model_as_it_was(tmp_path, lm_dir, text_jsonl):
    from transformers import AutoModelForCausalLM

    from curvedit.evaluate.perplexity import perplexity
    from curvedit.kfac.spectrum import load_bases

    factors, _ = factors_and_windows(tmp_path, lm_dir, text_jsonl)
    model = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    targets = select_targets(model, TargetSpec(preset="mlp"))
    bases = load_bases(targets, factors)
    windows = [Window([5, 6, 7, 8], [9, 10, 11])]
    step = step_directions(forget_gradients(model, windows, targets), targets, bases, EditRule(keep_fraction=0.5))
    heldout = [[i % 20 + 3 for i in range(j, j + 16)] for j in range(6)]
    before = [t.module.weight.detach().clone() for t in targets]
    unedited = perplexity(model, heldout).perplexity
    norm, found = step_within_budget(model, targets, step, heldout, budget=1.02, max_norm=5 * step.deletion_norm,
                                     steps=8)
    assert all(torch.equal(t.module.weight, b) for t, b in zip(targets, before))
    assert found.edited and norm > 0
    applied = apply_step(targets, step, norm)
    assert perplexity(model, heldout).perplexity <= 1.02 * unedited * (1 + 1e-9)
    applied.undo()
    bigger = [s for s in found.steps if (1 - s.amount) * 5 * step.deletion_norm > norm]
    assert bigger and not any(s.fits for s in bigger)  # every larger norm tried broke the budget


def test_edit_step_from_through_the_cli(tmp_path, lm_dir, text_jsonl):
    factors, memorized = factors_and_windows(tmp_path, lm_dir, text_jsonl)
    out = tmp_path / "stepped"
    result = CliRunner().invoke(app, ["edit", "--model", str(lm_dir), "--factors", str(factors), "--out", str(out),
                                      "--keep-fraction", "0.5", "--step-from", str(memorized), "--step-norm", "0.1",
                                      "--compute-dtype", "float32", "--no-progress"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "curvedit-edit.json").read_text())
    assert manifest["plan"]["compute_dtype"] == "float32"  # the step takes the edit's settings flags too
    assert manifest["step"]["norm"] == 0.1 and manifest["step"]["windows"] == 1
    assert 0 < manifest["step"]["gradient_share_in_block"] <= 1 and "wrote stepped model" in result.output
