"""The perplexity budget: bisecting the amount kept (library, `edit --ppl-budget`, the sweep's bisection mode)."""

import json
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

import curvedit.editing.budget
from curvedit.cli import app
from curvedit.data import lm_batches
from curvedit.editing.budget import BudgetError, bisect_amount, bisect_edit, edit_within_budget
from curvedit.editing.edit import EditPlan, EditRule, apply_edit
from curvedit.editing.settings import EditSettings
from curvedit.editing.sweep import SweepError, SweepGrid, SweepOptions, run_sweep
from curvedit.evaluate.perplexity import perplexity
from curvedit.evaluate.windows import Window
from curvedit.experiments.demo.pipeline import match_perplexity
from curvedit.kfac.collect import CollectOptions, collect_factors
from curvedit.kfac.factors import save_factors
from curvedit.kfac.spectrum import load_bases
from curvedit.kfac.targets import TargetSpec, select_targets
from tests.tiny_models import tiny_gpt2

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny GPT-2 trained for a few steps on a noisy arithmetic pattern (so that removing
    components costs perplexity, smoothly in the keep fraction), its MLP factors, held-out
    sequences and windows it was trained on."""
    generator = torch.Generator().manual_seed(0)
    start = torch.randint(1, 11, (64, 1), generator=generator)
    data = (start - 1 + 3 * torch.arange(12)) % 10 + 1
    noise = torch.rand(data.shape, generator=generator) < 0.2
    data = torch.where(noise, torch.randint(1, 11, data.shape, generator=generator), data)
    model = tiny_gpt2()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        optimizer.zero_grad()
        model(input_ids=data, labels=data).loss.backward()
        optimizer.step()
    model.eval().requires_grad_(False)
    ids = data.tolist()
    targets = select_targets(model, TargetSpec(preset="mlp"))
    factor_dir = tmp_path_factory.mktemp("budget") / "factors"
    save_factors(collect_factors(model, lm_batches(ids[:16], 8, 0), targets, options=CollectOptions(progress=False)),
                 factor_dir)
    windows = [Window(s[:6], s[6:]) for s in ids[32:40]]
    return SimpleNamespace(model=model, targets=targets, factors=factor_dir, bases=load_bases(targets, factor_dir),
                           heldout=ids[16:32], windows=windows)


def ppl_at(world, knob, amount):
    applied = apply_edit(world.targets, EditPlan([EditRule(**{knob: amount})]), world.bases)
    try:
        return perplexity(world.model, world.heldout).perplexity
    finally:
        applied.undo()


@pytest.mark.parametrize("knob", ["keep_fraction", "rho"])
def test_within_mode_respects_the_budget_and_stops_one_resolution_step_above_a_miss(trained, knob):
    before = {k: v.clone() for k, v in trained.model.state_dict().items()}
    search = bisect_amount(trained.model, trained.targets, trained.bases, trained.heldout, budget=1.15, knob=knob,
                           steps=6)
    unedited = perplexity(trained.model, trained.heldout).perplexity
    assert search.unedited_perplexity == unedited and search.target_perplexity == pytest.approx(1.15 * unedited)
    assert search.edited and len(search.steps) == 6
    assert search.perplexity <= search.target_perplexity
    assert search.perplexity == ppl_at(trained, knob, search.amount)  # the step measured is the edit chosen
    assert search.amount == min(s.amount for s in search.steps if s.fits)
    assert all(0 < s.kept < s.total for s in search.steps)
    below = [s for s in search.steps if s.amount == search.amount - 1 / 64]
    assert len(below) == 1 and not below[0].fits  # one resolution step less was measured over the budget
    after = trained.model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_within_mode_is_minimal_up_to_the_resolution_against_a_brute_force_scan(trained):
    # the keep fraction is smooth here (rho is not: its perplexity curve has bumps, where
    # bisection is only minimal locally, as the test above checks)
    search = bisect_amount(trained.model, trained.targets, trained.bases, trained.heldout, budget=1.15, steps=6)
    scan = [k / 128 for k in range(1, 129)]  # a grid twice as fine as the bisection's
    smallest = min(a for a in scan if ppl_at(trained, "keep_fraction", a) <= search.target_perplexity)
    assert smallest <= search.amount <= smallest + 1 / 64


def test_match_mode_lands_near_the_target_and_the_demo_uses_it(trained):
    unedited = perplexity(trained.model, trained.heldout).perplexity
    search = bisect_amount(trained.model, trained.targets, trained.bases, trained.heldout, mode="match",
                           target_ppl=1.05 * unedited, unedited_ppl=unedited, steps=10)
    assert len(search.steps) == 10 and search.ppl_budget is None
    assert abs(search.perplexity / search.target_perplexity - 1) < 0.01
    gaps = [abs(s.perplexity / search.target_perplexity - 1) for s in search.steps]
    assert abs(search.perplexity / search.target_perplexity - 1) == min(gaps)

    early = bisect_amount(trained.model, trained.targets, trained.bases, trained.heldout, mode="match",
                          target_ppl=1.05 * unedited, steps=10, tolerance=0.03)
    assert len(early.steps) < 10 and abs(early.perplexity / early.target_perplexity - 1) <= 0.03
    probe = SimpleNamespace(text=trained.heldout)
    demo = match_perplexity(trained.model, probe, trained.targets, "kfac", 1.05 * unedited, unedited, trained.bases, 0)
    assert demo.matches() and abs(demo.perplexity - 1.05 * unedited) <= 0.1 * 0.05 * unedited


def test_match_mode_returns_an_edit_even_when_the_unedited_model_is_closer(trained):
    unedited = perplexity(trained.model, trained.heldout).perplexity
    # a target a hair above unedited: the unedited model is closer than any edit tried in 3 steps
    search = bisect_amount(trained.model, trained.targets, trained.bases, trained.heldout, mode="match",
                           target_ppl=unedited * (1 + 1e-9), unedited_ppl=unedited, steps=3)
    assert search.edited and search.amount < 1.0
    gaps = [abs(s.perplexity / search.target_perplexity - 1) for s in search.steps]
    assert abs(search.perplexity / search.target_perplexity - 1) == min(gaps)


def test_an_amount_that_rounds_to_keeping_everything_is_no_edit(trained):
    # SVD keeps round(keep_fraction * rank) singular values: amounts near 1 keep all of them
    unedited = perplexity(trained.model, trained.heldout).perplexity
    search = bisect_amount(trained.model, trained.targets, None, trained.heldout, mode="match",
                           target_ppl=unedited * (1 + 1e-09), unedited_ppl=unedited, steps=12,
                           settings=EditSettings(method="svd"))
    assert any(step.kept == step.total for step in search.steps)  # the case arises
    chosen = [step for step in search.steps if step.amount == search.amount]
    assert search.edited and chosen and chosen[0].kept < chosen[0].total


def test_nothing_within_the_target_returns_no_edit(trained):
    unedited = perplexity(trained.model, trained.heldout).perplexity
    search = bisect_amount(trained.model, trained.targets, trained.bases, trained.heldout, target_ppl=0.5 * unedited,
                           steps=4)
    assert search.amount == 1.0 and not search.edited and search.perplexity == unedited
    assert [s.amount for s in search.steps] == [0.5, 0.75, 0.875, 0.9375] and not any(s.fits for s in search.steps)
    assert "no edit" in search.table() and search.rule() == EditRule("*", keep_fraction=1.0)


def test_the_model_is_restored_when_an_evaluation_fails(trained, monkeypatch):
    before = {k: v.clone() for k, v in trained.model.state_dict().items()}
    real = curvedit.editing.budget.perplexity
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(curvedit.editing.budget, "perplexity", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        bisect_amount(trained.model, trained.targets, trained.bases, trained.heldout, budget=1.1)
    after = trained.model.state_dict()
    assert len(calls) == 2 and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("kwargs, message", [
    ({"budget": 0.9}, "at least 1"),
    ({"budget": 1.1, "target_ppl": 3.0}, "exactly one"),
    ({}, "exactly one"),
    ({"budget": 1.1, "knob": "mass"}, "unknown budget knob"),
    ({"budget": 1.1, "mode": "closest"}, "unknown mode"),
    ({"budget": 1.1, "steps": 0}, "steps"),
    ({"target_ppl": -1.0}, "positive"),
])
def test_bad_requests_are_refused_with_the_reason(trained, kwargs, message):
    with pytest.raises(BudgetError, match=message):
        bisect_amount(trained.model, trained.targets, trained.bases, trained.heldout, **kwargs)
    assert issubclass(BudgetError, ValueError)


def test_no_heldout_sequence_is_refused(trained):
    with pytest.raises(BudgetError, match="held-out sequence"):
        bisect_amount(trained.model, trained.targets, trained.bases, [], budget=1.1)


def test_edit_within_budget_applies_the_chosen_amount(trained):
    search, applied = edit_within_budget(trained.model, trained.targets, trained.factors, trained.heldout,
                                         budget=1.2, steps=5)
    try:
        assert perplexity(trained.model, trained.heldout).perplexity == search.perplexity
        assert search.perplexity <= 1.2 * search.unedited_perplexity
        assert applied.plan.rules == [EditRule("*", keep_fraction=search.amount)]
    finally:
        applied.undo()


def test_the_sweep_bisects_one_point_per_cell_within_budget(trained, tmp_path):
    before = {k: v.clone() for k, v in trained.model.state_dict().items()}
    grid = SweepGrid(layers=("0", "1", "0-1"), matrices=("mlp-in", "mlp"))
    options = SweepOptions(progress=False, ppl_budget=1.1, bisect_budget=True, bisect_steps=5)
    result = run_sweep(trained.model, None, trained.factors, grid, trained.windows, trained.heldout, options)
    assert [(p.layers, p.matrices) for p in result.points] == [(g, m) for g in grid.layers for m in grid.matrices]
    for p in result.points:
        assert p.amount_kind == "keep_fraction" and p.amount == p.bisection["amount"]
        assert len(p.bisection["steps"]) == 5
        assert p.perplexity == p.bisection["perplexity"] <= 1.1 * result.baseline.perplexity
    assert result.chosen is not None and result.chosen in result.front
    data = json.loads(result.write(tmp_path / "sweep")[0].read_text())
    assert len(data["points"][0]["bisection"]["steps"]) == 5 and data["options"]["bisect_budget"]
    after = trained.model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)

    with pytest.raises(SweepError, match="no rho or keep-fraction"):
        run_sweep(trained.model, None, trained.factors, SweepGrid(layers=("0",), rho=(0.5,)), trained.windows,
                  trained.heldout, options)
    with pytest.raises(SweepError, match="at least 1"):
        run_sweep(trained.model, None, trained.factors, grid, trained.windows, trained.heldout,
                  SweepOptions(progress=False, ppl_budget=None, bisect_budget=True))


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_cli_edit_with_a_perplexity_budget_writes_the_steps(tmp_path, lm_dir, text_jsonl):
    factors = tmp_path / "factors"
    assert run("collect", "--model", lm_dir, "--data", text_jsonl, "--out", factors, "--seq-len", 16,
               "--no-progress").exit_code == 0
    out = tmp_path / "edited"
    result = run("edit", "--model", lm_dir, "--factors", factors, "--layers", 1, "--preset", "mlp-in", "--out", out,
                 "--ppl-budget", 1.05, "--heldout", text_jsonl, "--heldout-seq-len", 16, "--budget-steps", 4,
                 "--no-progress")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "curvedit-edit.json").read_text())
    budget = manifest["budget"]
    assert budget["ppl_budget"] == 1.05 and budget["knob"] == "keep_fraction" and len(budget["steps"]) == 4
    assert budget["perplexity"] <= 1.05 * budget["unedited_perplexity"]
    assert manifest["plan"]["rules"][0]["keep_fraction"] == budget["amount"] < 1
    assert list(manifest["targets"]) == ["transformer.h.1.mlp.c_fc"]
    assert "x unedited" in result.output and f"chosen keep_fraction={budget['amount']:g}" in result.output

    sweep_out = tmp_path / "sweep"
    memorized = tmp_path / "tune.jsonl"
    memorized.write_text(json.dumps({"prefix": "the quick brown", "suffix": " fox jumps"}) + "\n")
    result = run("sweep", "--model", lm_dir, "--factors", factors, "--layers-grid", "0;1", "--memorized", memorized,
                 "--heldout", text_jsonl, "--heldout-seq-len", 16, "--out", sweep_out, "--bisect-budget",
                 "--budget-steps", 3, "--no-progress")
    assert result.exit_code == 0, result.output
    points = json.loads((sweep_out / "sweep.json").read_text())["points"]
    assert len(points) == 2 and all(len(p["bisection"]["steps"]) == 3 for p in points)


@pytest.mark.parametrize("extra, message", [
    (["--ppl-budget", 1.1, "--heldout", "H", "--rho", 0.6], "without --rho, --keep-fraction or --plan"),
    (["--ppl-budget", 1.1, "--heldout", "H", "--keep-fraction", 0.5], "without --rho, --keep-fraction or --plan"),
    (["--ppl-budget", 1.1, "--heldout", "H", "--plan", "plan.json"], "without --rho, --keep-fraction or --plan"),
    (["--ppl-budget", 1.1], "needs --heldout"),
    (["--rho", 0.6, "--heldout", "H"], "only read with --ppl-budget"),
])
def test_cli_edit_refuses_conflicting_budget_flags(tmp_path, extra, message):
    result = run("edit", "--model", tmp_path / "m", "--out", tmp_path / "out", *extra)
    assert result.exit_code == 2 and message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_edit_refuses_a_budget_below_one(tmp_path, lm_dir, text_jsonl):
    result = run("edit", "--model", lm_dir, "--method", "svd", "--out", tmp_path / "out", "--ppl-budget", 0.9,
                 "--heldout", text_jsonl, "--heldout-seq-len", 16, "--no-progress")
    assert result.exit_code == 2 and "at least 1" in result.output and not (tmp_path / "out").exists()


def test_an_svd_amount_that_would_keep_nothing_is_skipped_as_too_strong(trained):
    # any perplexity fits, so the search halves the keep fraction until it rounds to no singular value
    search = bisect_amount(trained.model, trained.targets, None, trained.heldout, mode="within", budget=1e9, steps=12,
                           settings=EditSettings(method="svd"))
    assert len(search.steps) < 12  # the amounts that keep nothing were skipped, not measured
    assert all(step.kept >= 1 for step in search.steps) and search.edited
    assert search.amount == min(step.amount for step in search.steps)


class _Applied:
    """An in-memory edit of `amount` that keeps `amount` of 1024 components (a stand-in)."""

    def __init__(self, amount: float) -> None:
        self.amount = amount
        self.stats = [SimpleNamespace(kept=int(amount * 1024), total=1024)]

    def undo(self) -> None:
        pass


def test_bisect_edit_finds_the_least_edit_that_brings_a_value_down_to_a_bound():
    current: list[float] = []

    def apply(amount: float) -> _Applied:
        current[:] = [amount]
        return _Applied(amount)

    def recall() -> float:  # recall falls as less is kept: here it is the amount itself
        return current[0]

    least = bisect_edit(apply, lambda: -recall(), -0.3, mode="least", gap=lambda v: abs(v + 0.3), steps=10)
    assert least.edited and least.amount <= 0.3 < least.amount + 2 ** -10  # the largest amount with recall <= 0.3
    assert -least.value <= 0.3
    within = bisect_edit(apply, lambda: 1 - recall(), 0.7, mode="within", gap=lambda v: abs(v - 0.7), steps=10)
    assert within.amount - 2 ** -10 < 0.3 <= within.amount  # the smallest amount with 1 - recall <= 0.7
    never = bisect_edit(apply, lambda: -recall(), -1e-9, mode="least", gap=lambda v: 0.0, steps=4)
    assert not never.edited and never.amount == 1.0  # no candidate reached the bound: nothing chosen
