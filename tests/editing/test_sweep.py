"""The sweep: grid points evaluated in memory, the Pareto front, the choice under a budget."""

import json

import pytest
import torch
from typer.testing import CliRunner

import curvedit.kfac.spectrum
from curvedit.cli import app
from curvedit.editing.edit import EditPlan, EditRule, apply_edit
from curvedit.editing.settings import EditSettings
from curvedit.editing.sweep import (
    SweepError,
    SweepGrid,
    SweepOptions,
    SweepPoint,
    choose_point,
    exclusion,
    pareto_front,
    parse_probe_floor,
    run_sweep,
)
from curvedit.evaluate.memorization import evaluate_recitation
from curvedit.evaluate.perplexity import perplexity
from curvedit.evaluate.privacy import suffix_nll
from curvedit.kfac.spectrum import load_bases
from curvedit.kfac.targets import TargetSpec, select_targets
from tests.helpers import factors_and_windows


def quiet(**kwargs):
    return SweepOptions(progress=False, **kwargs)


def test_a_two_by_two_grid_gives_four_points_and_leaves_the_model_bit_identical(world, monkeypatch):
    model, factors, windows, heldout = world
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    real_eigenbasis = curvedit.kfac.spectrum.eigenbasis
    monkeypatch.setattr(curvedit.kfac.spectrum, "eigenbasis", lambda *args: calls.append(1) or real_eigenbasis(*args))
    grid = SweepGrid(layers=("0", "1"), matrices=("mlp-in",), rho=(0.5, 0.9))
    result = run_sweep(model, None, factors, grid, windows, heldout, quiet(ppl_budget=1.5))

    assert [(p.layers, p.amount_kind, p.amount) for p in result.points] == [
        ("0", "rho", 0.5), ("0", "rho", 0.9), ("1", "rho", 0.5), ("1", "rho", 0.9)]
    assert list(result.points[2].targets) == ["transformer.h.1.mlp.c_fc"]
    assert all(0 < p.kept < p.total == 64 * 16 for p in result.points)
    assert len(calls) == 2  # one eigendecomposition per target for the whole grid
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)

    applied = apply_edit(select_targets(model, TargetSpec(preset="mlp-in", layers="1")),
                         EditPlan([EditRule(rho=0.5)]), load_bases(select_targets(model, TargetSpec(preset="mlp-in")),
                                                                   factors))
    recitation, _ = evaluate_recitation(model, windows)
    direct, held = perplexity(model, heldout).perplexity, suffix_nll(model, windows)
    applied.undo()
    assert result.points[2].loose == recitation.loose and result.points[2].perplexity == direct
    assert result.points[2].suffix_nll == held > result.baseline.suffix_nll  # the edit loosened the suffixes
    assert result.baseline.perplexity == perplexity(model, heldout).perplexity

    calls.clear()
    run_sweep(model, None, factors, grid, windows, heldout, quiet())
    assert calls == []  # the second sweep reads the cached eigenbases


def test_the_chosen_point_respects_the_budget_and_the_outputs_are_written(world, tmp_path):
    model, factors, windows, heldout = world
    grid = SweepGrid(layers=("0-1",), matrices=("mlp-in", "mlp"), rho=(0.3,), keep_fraction=(0.5, 0.95))
    result = run_sweep(model, None, factors, grid, windows, heldout, quiet(ppl_budget=1.05, metric="similarity"))
    assert len(result.points) == 6
    assert result.chosen is not None
    assert result.points[result.chosen].perplexity <= 1.05 * result.baseline.perplexity
    assert result.chosen in result.front
    json_path, png_path = result.write(tmp_path / "out")
    data = json.loads(json_path.read_text())
    assert [p["on_front"] for p in data["points"]] == [i in result.front for i in range(6)]
    assert [p["chosen"] for p in data["points"]] == [i == result.chosen for i in range(6)]
    assert data["baseline"]["label"] == "unedited" and data["baseline"]["ppl_ratio"] == 1.0
    assert png_path.stat().st_size > 0


def point(loose, ppl, distance=0.0):
    return SweepPoint(layers="1", matrices="mlp-in", amount_kind="rho", amount=0.9, method="kfac", strict=loose,
                      loose=loose, avg_normalized_distance=distance, perplexity=ppl)


# index:      0            1            2            3            4            5             6            7
HAND = [point(0.9, 10), point(0.5, 11), point(0.5, 12), point(0.2, 15), point(0.2, 15), point(0.6, 11.5),
        point(0.0, 30), point(0.9, 10)]


def test_the_pareto_front_keeps_ties_and_drops_dominated_points():
    # 2 (same memorization, worse perplexity than 1) and 5 (worse on both than 1) are dominated;
    # the identical pairs 0/7 and 3/4 do not dominate each other.
    assert pareto_front(HAND) == [0, 7, 1, 3, 4, 6]
    assert pareto_front([]) == []
    assert pareto_front([point(0.4, float("nan")), point(0.4, 20)]) == [1]  # NaN counts as worst


def test_the_front_can_be_taken_on_the_distance_metric():
    points = [point(1.0, 10, distance=0.1), point(1.0, 12, distance=0.6), point(1.0, 11, distance=0.05)]
    assert pareto_front(points, metric="loose") == [0]
    assert pareto_front(points, metric="similarity") == [0, 1]  # higher distance = less memorization


def test_the_choice_is_the_least_memorization_within_the_budget():
    assert choose_point(HAND, baseline_ppl=10, budget=1.2) == 1  # ties 1/2 on memorization: lower perplexity
    assert choose_point(HAND, baseline_ppl=10, budget=1.5) == 3  # exact tie 3/4: the earlier point
    assert choose_point(HAND, baseline_ppl=10, budget=3.0) == 6
    assert choose_point(HAND, baseline_ppl=10, budget=0.5) is None
    for budget in (1.0, 1.2, 1.5, 3.0):
        chosen = choose_point(HAND, 10, budget)
        assert HAND[chosen].perplexity <= budget * 10 and chosen in pareto_front(HAND)
    with pytest.raises(SweepError, match="positive"):
        choose_point(HAND, baseline_ppl=10, budget=0)


def test_bad_grids_are_refused_with_the_reason(world):
    model, factors, windows, heldout = world
    with pytest.raises(SweepError, match="at least one rho or keep-fraction"):
        run_sweep(model, None, factors, SweepGrid(layers=("0",)), windows, heldout, quiet())
    with pytest.raises(SweepError, match=r"layers='7'"):
        run_sweep(model, None, factors, SweepGrid(layers=("7",), rho=(0.5,)), windows, heldout, quiet())
    with pytest.raises(SweepError, match=r"in \(0, 1\]"):
        run_sweep(model, None, factors, SweepGrid(layers=("0",), rho=(1.5,)), windows, heldout, quiet())
    with pytest.raises(SweepError, match="memorized window"):
        run_sweep(model, None, factors, SweepGrid(layers=("0",), rho=(0.5,)), [], heldout, quiet())


def test_cli_sweep(tmp_path, lm_dir, text_jsonl):
    runner = CliRunner()
    factors, memorized = factors_and_windows(tmp_path, lm_dir, text_jsonl)
    out = tmp_path / "sweep"
    args = ["sweep", "--model", str(lm_dir), "--factors", str(factors), "--layers-grid", "0;0-1",
            "--matrices", "mlp-in", "--rho-grid", "0.9", "--keep-grid", "0.5", "--memorized", str(memorized),
            "--heldout", str(text_jsonl), "--heldout-seq-len", "16", "--out", str(out), "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "sweep.json").read_text())
    assert len(data["points"]) == 4 and data["grid"]["layers"] == ["0", "0-1"]
    assert (out / "sweep.png").is_file() and "unedited" in result.output
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_a_point_is_excluded_with_its_reasons_and_the_choice_skips_excluded_points():
    base = SweepPoint(perplexity=10.0, probes={"add": 0.8, "facts": 0.5, "logic": 0.5})
    points = [SweepPoint(layers="0", amount_kind="rho", loose=0.0, perplexity=10.5, probes={"add": 0.2, "facts": 0.5}),
              SweepPoint(layers="1", amount_kind="rho", loose=0.3, perplexity=10.2, probes={"add": 0.8, "facts": 0.45}),
              SweepPoint(layers="2", amount_kind="rho", loose=0.1, perplexity=12.0, probes={"add": 0.8, "facts": 0.5})]
    reasons = [exclusion(p, base, budget=1.1, probe_floor=0.9, usable=["add", "facts"]) for p in points]
    assert reasons == ["add kept 25% < 90%", "", "perplexity 1.200x > 1.1x"]
    assert exclusion(points[0], base, budget=1.1) == ""  # without a floor only the budget counts
    assert choose_point(points, 10.0, 1.1) == 0
    assert choose_point(points, 10.0, 1.1, allowed=[not r for r in reasons]) == 1
    assert choose_point(points, 10.0, 1.1, allowed=[False, False, True]) is None


def test_a_floor_per_family_holds_the_families_it_names_and_star_holds_the_rest():
    base = SweepPoint(perplexity=10.0, probes={"add": 0.8, "facts": 0.5})
    point = SweepPoint(layers="0", amount_kind="rho", perplexity=10.0, probes={"add": 0.2, "facts": 0.4})
    usable = ["add", "facts"]
    assert exclusion(point, base, 1.1, {"facts": 0.7}, usable) == ""  # facts kept 80%; add is not held
    assert exclusion(point, base, 1.1, {"facts": 0.9}, usable) == "facts kept 80% < 90%"
    assert exclusion(point, base, 1.1, {"*": 0.5, "facts": 0.9}, usable) == "add kept 25% < 50%; facts kept 80% < 90%"
    assert exclusion(point, base, 1.1, {"facts": 0.9}, ["add"]) == ""  # an unusable family is never held
    assert parse_probe_floor(["0.7", "open_book=0.9"]) == {"*": 0.7, "open_book": 0.9}
    assert parse_probe_floor([]) is None
    assert SweepOptions(probe_floor=0.6).probe_floor == {"*": 0.6}
    for bad, message in [(["a=0.5", "a=0.6"], "a is given twice"), (["a=high"], "FAMILY=share"),
                         (["=0.5"], "no family"), (["0.5", "0.6"], r"\* is given twice")]:
        with pytest.raises(SweepError, match=message):
            parse_probe_floor(bad)
    with pytest.raises(SweepError, match="of facts is a share"):
        SweepOptions(probe_floor={"facts": 1.5}).validate()


def test_sweep_under_a_probe_floor_through_the_cli(tmp_path, lm_dir, text_jsonl):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from curvedit.evaluate.tasks import _Encoder, choice_scores

    model, tokenizer = AutoModelForCausalLM.from_pretrained(lm_dir).eval(), AutoTokenizer.from_pretrained(lm_dir)
    encoder, rows = _Encoder(tokenizer), []
    words = ["fox", "dog", "cat", "hen", "owl", "ram", "elk", "yak"]
    for i in range(24):  # choice items whose answer is the unedited model's own pick: it scores 100%
        prompt = f"{('the', 'a', 'one')[i // 8]} {words[i % 8]} and the"
        choices = [f" {words[(i + 1) % 8]}", f" {words[(i + 3) % 8]}"]
        scores = choice_scores(model, [encoder.split(prompt, c) for c in choices])
        rows.append({"type": "choice", "prompt": prompt, "choices": choices,
                     "answer": max(range(2), key=lambda k: scores[k][0])})
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runner = CliRunner()
    factors, memorized = factors_and_windows(tmp_path, lm_dir, text_jsonl)
    args = ["sweep", "--model", str(lm_dir), "--factors", str(factors), "--layers-grid", "0;0-1",
            "--matrices", "mlp", "--keep-grid", "0.02,0.5,0.98", "--memorized", str(memorized),
            "--heldout", str(text_jsonl), "--heldout-seq-len", "16", "--ppl-budget", "100", "--no-progress",
            "--tasks", str(tmp_path / "tasks"), "--probe-floor", "1.0", "--out", str(tmp_path / "sweep")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert data["usable_probes"] == ["mine"] and data["baseline"]["probes"] == {"mine": 1.0}
    for p in data["points"]:
        assert ("mine kept" in p["excluded"]) == (p["probes"]["mine"] < 1.0)
        assert not (p["chosen"] and p["excluded"])
    assert any(p["probes"]["mine"] < 1.0 for p in data["points"])  # the floor had something to exclude
    assert "usable: mine" in result.output
    no_tasks = runner.invoke(app, args[:-6] + ["--probe-floor", "0.9", "--out", str(tmp_path / "other")])
    assert no_tasks.exit_code == 2 and "--probe-floor needs --tasks" in no_tasks.output


def test_sweep_protected_by_the_general_factors_is_the_plain_sweep(world):
    model, factors, windows, heldout = world
    grid = SweepGrid(layers=("0-1",), matrices=("mlp",), keep_fraction=(0.3, 0.7))
    plain = run_sweep(model, None, factors, grid, windows, heldout, quiet())
    protected = run_sweep(model, None, factors, grid, windows, heldout, quiet(), protect_dir=factors)
    assert [(p.kept, p.perplexity) for p in protected.points] == [(p.kept, p.perplexity) for p in plain.points]
    with pytest.raises(SweepError, match="svd"):
        run_sweep(model, None, factors, SweepGrid(layers=("0",), keep_fraction=(0.5,)), windows, heldout,
                  quiet(settings=EditSettings(method="svd")), protect_dir=factors)


def test_an_interrupted_sweep_resumes_at_its_next_point_and_ends_as_an_uninterrupted_one(world, tmp_path,
                                                                                         monkeypatch):
    import curvedit.editing.sweep as sweep_module

    model, factors, windows, heldout = world
    grid = SweepGrid(layers=("0", "1"), matrices=("mlp-in",), rho=(0.5, 0.9))
    journal = tmp_path / "sweep.journal.jsonl"
    real, calls = sweep_module._evaluate, []

    def killed_at_the_third_point(*args):
        calls.append(1)
        if len(calls) == 4:  # the unedited model, two points, then the kill
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(sweep_module, "_evaluate", killed_at_the_third_point)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(model, None, factors, grid, windows, heldout, quiet(ppl_budget=1.5), journal=journal)
    assert len(journal.read_text().splitlines()) == 1 + 1 + 2  # key, the unedited model, two points
    calls.clear()
    resumed = run_sweep(model, None, factors, grid, windows, heldout, quiet(ppl_budget=1.5), journal=journal)
    assert len(calls) == 2  # only the two points left were evaluated
    monkeypatch.setattr(sweep_module, "_evaluate", real)
    whole = run_sweep(model, None, factors, grid, windows, heldout, quiet(ppl_budget=1.5))  # bases read back as above
    assert resumed.to_dict() == whole.to_dict() and not journal.exists()


@pytest.mark.parametrize("change", ["grid", "weights", "windows"])  # weights outside the swept targets too
def test_a_sweep_refuses_the_journal_of_another_sweep(world, tmp_path, monkeypatch, change):
    import curvedit.editing.sweep as sweep_module
    from curvedit.io import JournalError

    model, factors, windows, heldout = world
    journal = tmp_path / "sweep.journal.jsonl"
    grid = SweepGrid(layers=("0",), matrices=("mlp-in",), rho=(0.5,))
    real = sweep_module._evaluate
    monkeypatch.setattr(sweep_module, "_evaluate", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt)
                        if journal.exists() else real(*a))  # killed after the unedited model
    with pytest.raises(KeyboardInterrupt):
        run_sweep(model, None, factors, grid, windows, heldout, quiet(), journal=journal)
    monkeypatch.setattr(sweep_module, "_evaluate", real)
    if change == "grid":
        grid = SweepGrid(layers=("0",), matrices=("mlp-in",), rho=(0.7,))
    elif change == "weights":
        with torch.no_grad():
            model.transformer.h[0].attn.c_attn.weight[0, 0] += 1e-3
    else:
        windows = windows[:1]
    with pytest.raises(JournalError, match="another sweep"):
        run_sweep(model, None, factors, grid, windows, heldout, quiet(), journal=journal)


def test_cli_sweep_interrupted_then_resumed(tmp_path, lm_dir, text_jsonl, monkeypatch):
    import curvedit.editing.sweep as sweep_module

    factors, memorized = factors_and_windows(tmp_path, lm_dir, text_jsonl)
    out = tmp_path / "sweep"
    args = ["sweep", "--model", str(lm_dir), "--factors", str(factors), "--layers-grid", "0;0-1",
            "--matrices", "mlp-in", "--rho-grid", "0.9", "--memorized", str(memorized),
            "--heldout", str(text_jsonl), "--heldout-seq-len", "16", "--out", str(out), "--no-progress"]
    real, calls = sweep_module._evaluate, []
    monkeypatch.setattr(sweep_module, "_evaluate", lambda *a: calls.append(1) or (
        (_ for _ in ()).throw(KeyboardInterrupt) if len(calls) == 3 else real(*a)))
    runner = CliRunner()
    killed = runner.invoke(app, args)
    assert killed.exit_code == 130 and "--resume" in killed.output and (out / "sweep.journal.jsonl").is_file()
    assert runner.invoke(app, args).exit_code == 2  # an unfinished run is not silently restarted
    calls.clear()
    resumed = runner.invoke(app, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert len(calls) == 1 and len(json.loads((out / "sweep.json").read_text())["points"]) == 2
    assert not (out / "sweep.journal.jsonl").exists()
