"""The targeted edit: forget-set masses against a per-position brute force, the ratio selection
by hand, and the edit through the API and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from curvedit.cli import app
from curvedit.data import pad_batch
from curvedit.editing.edit import EditError, EditPlan, EditRule, edit_model
from curvedit.editing.settings import EditSettings
from curvedit.editing.targeted import forget_masses, general_masses, targeted_mask
from curvedit.evaluate.windows import Window
from curvedit.kfac.collect import CollectOptions, collect_factors
from curvedit.kfac.factors import save_factors
from curvedit.kfac.spectrum import SelectionError, eigenbasis, load_bases
from curvedit.kfac.targets import TargetSpec, select_targets
from tests.helpers import target_io
from tests.tiny_models import char_model_dir, tiny_olmo2

WINDOWS = [Window([1, 2, 3], [4, 5]), Window([6, 7], [8, 9, 10]), Window([2, 4, 6, 8], [3])]


def test_targeted_mask_by_hand():
    forget = torch.tensor([[4.0, 1.0], [1.0, 0.0]])
    general = torch.ones(2, 2)
    # the two highest ratios go: 4, then the first 1 in row-major order
    assert targeted_mask(forget, general, keep_fraction=0.5).tolist() == [[False, False], [True, True]]
    # keep 75% of the general mass: one component (a quarter of it) may go
    assert targeted_mask(forget, general, rho=0.75).tolist() == [[False, True], [True, True]]
    # a component heavy in the forget set but heavier still in general data ranks low
    assert targeted_mask(forget, torch.tensor([[100.0, 1.0], [1.0, 1.0]]), keep_fraction=0.75).tolist() == [
        [True, False], [True, True]]
    with pytest.raises(SelectionError, match="exactly one"):
        targeted_mask(forget, general)


def brute_force_forget(model, targets, bases, windows):
    """mean over suffix-predicting positions of (U_G^T (g x^T) U_A)^2, one window at a time."""
    sums, count = {t.name: 0 for t in targets}, 0
    for w in windows:
        ids = torch.tensor([w.prefix_ids + w.suffix_ids])
        positions = range(len(w.prefix_ids) - 1, len(w.prefix_ids) + len(w.suffix_ids) - 1)
        io = target_io(model, targets, ids, lambda logits, ids=ids, positions=positions: sum(
            F.cross_entropy(logits[p][None], ids[0, p + 1][None], reduction="sum") for p in positions))
        count += len(positions)
        for name, (x, g) in io.items():
            basis = bases[name]
            for p in positions:
                sums[name] = sums[name] + (basis.U_G.T @ torch.outer(g[p], x[p]) @ basis.U_A).square()
    return {name: total / count for name, total in sums.items()}


def test_forget_masses_equal_per_position_brute_force():
    model = tiny_olmo2()
    targets = select_targets(model, TargetSpec(preset="mlp"))
    general = [pad_batch([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]], 0, "right")]
    factors = collect_factors(model, general, targets, options=CollectOptions(label_mode="gold",
                                                                              accumulate_dtype="float64",
                                                                              progress=False))
    bases = {name: eigenbasis(tf) for name, tf in factors.targets.items()}
    got = forget_masses(model, WINDOWS, targets, bases, batch_size=2)
    ref_model = tiny_olmo2()
    reference = brute_force_forget(ref_model, select_targets(ref_model, TargetSpec(preset="mlp")), bases, WINDOWS)
    for target in targets:
        assert torch.allclose(got[target.name], reference[target.name], rtol=1e-9, atol=1e-14), target.name


def test_targeted_edit_removes_the_highest_ratio_components(tmp_path):
    model = tiny_olmo2()
    targets = select_targets(model, TargetSpec(preset="mlp"))
    general = [pad_batch([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]], 0, "right")]
    save_factors(collect_factors(model, general, targets, options=CollectOptions(progress=False)), tmp_path / "f")
    bases = load_bases(targets, tmp_path / "f")
    masses = forget_masses(model, WINDOWS, targets, bases)
    before = {t.name: t.weight_oi().clone() for t in targets}
    plan = EditPlan([EditRule(keep_fraction=0.8)], EditSettings(masses="targeted"))
    applied = edit_model(model, targets, plan, tmp_path / "f", forget=WINDOWS)
    for target in targets:
        basis = bases[target.name]
        mask = targeted_mask(masses[target.name], general_masses(basis), keep_fraction=0.8)
        w = before[target.name]
        expected = basis.U_G @ ((basis.U_G.T @ w.double() @ basis.U_A) * mask) @ basis.U_A.T
        assert torch.allclose(target.weight_oi(), expected.to(w), atol=1e-12)
    applied.undo()
    with pytest.raises(EditError, match="forget set"):
        edit_model(model, targets, EditPlan([EditRule(keep_fraction=0.8)], EditSettings(masses="targeted")),
                   tmp_path / "f")


def test_cli_edit_forget(tmp_path):
    char_model_dir(tmp_path)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": "abcdefgh" * 3 + t}) + "\n" for t in "abcdefgh"))
    (tmp_path / "forget.jsonl").write_text(json.dumps({"prefix": "abcde", "suffix": "fgh"}) + "\n")
    runner = CliRunner()
    assert runner.invoke(app, ["collect", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "c.jsonl"),
                               "--out", str(tmp_path / "f"), "--seq-len", "16", "--no-progress"]).exit_code == 0
    done = runner.invoke(app, ["edit", "--model", str(tmp_path / "m"), "--factors", str(tmp_path / "f"),
                               "--keep-fraction", "0.9", "--forget", str(tmp_path / "forget.jsonl"),
                               "--out", str(tmp_path / "e"), "--no-progress"])
    assert done.exit_code == 0, done.output
    manifest = json.loads((tmp_path / "e" / "curvedit-edit.json").read_text())
    assert manifest["plan"]["masses"] == "targeted" and manifest["forget"]["windows"] == 1
