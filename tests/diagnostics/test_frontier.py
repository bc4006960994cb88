"""The frontier (`curvedit frontier`): every method's held-out forgetting against its cost in nats."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from curvedit.cli import app
from curvedit.diagnostics.frontier import FrontierError, FrontierOptions, FrontierPoint, FrontierResult, run_frontier
from curvedit.editing.edit import EditPlan, EditRule, apply_edit, method_bases
from curvedit.editing.settings import EditSettings
from curvedit.evaluate.intervals import wilson
from curvedit.evaluate.memorization import evaluate_recitation
from curvedit.evaluate.perplexity import perplexity
from curvedit.evaluate.windows import Window
from curvedit.kfac.targets import TargetSpec, select_targets
from tests.helpers import factors_and_windows


def test_each_point_is_its_method_s_edit_measured_and_the_model_is_left_as_it_was(tmp_path, lm_dir, text_jsonl):
    from transformers import AutoModelForCausalLM

    factors, _ = factors_and_windows(tmp_path, lm_dir, text_jsonl)
    model = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    targets = select_targets(model, TargetSpec(preset="mlp-in"))
    windows = [Window([5, 6, 7, 8], [9, 10, 11]), Window([3, 4, 5], [6, 7])]
    heldout = [[i % 20 + 3 for i in range(j, j + 16)] for j in range(6)]
    before = [t.module.weight.detach().clone() for t in targets]
    options = FrontierOptions(keep_fractions=(0.9, 0.5), progress=False)
    result = run_frontier(model, None, factors, targets, windows, heldout, options)
    assert all(torch.equal(t.module.weight, b) for t, b in zip(targets, before))
    assert [(p.method, p.keep_fraction) for p in result.points] == [(m, k) for m in options.methods for k in (0.9, 0.5)]
    assert result.baseline.nats["value"] == 0.0
    unedited = perplexity(model, heldout)
    kfac = next(p for p in result.points if p.method == "kfac" and p.keep_fraction == 0.5)
    bases = method_bases(model, targets, factors, EditSettings(method="kfac"))
    applied = apply_edit(targets, EditPlan([EditRule(keep_fraction=0.5)]), bases)
    edited = perplexity(model, heldout)
    recitation, _ = evaluate_recitation(model, windows)
    applied.undo()
    assert kfac.nats["value"] == pytest.approx(math.log(edited.perplexity / unedited.perplexity), rel=1e-9)
    assert kfac.loose["value"] == recitation.loose and kfac.strict["n"] == 2
    for p in result.points:
        assert p.nats["low"] <= p.nats["value"] <= p.nats["high"] and p.loose["low"] <= p.loose["value"]
    magnitude = next(p for p in result.points if p.method == "magnitude" and p.keep_fraction == 0.5)
    assert abs(magnitude.kept / magnitude.total - 0.5) < 0.01  # half the weight entries


def _point(method: str, keep: float, recalled: int, nats: float, n: int = 20) -> FrontierPoint:
    loose = wilson(recalled, n).to_dict()
    return FrontierPoint(method=method, keep_fraction=keep, kept=0, total=1, strict=loose, loose=loose,
                         nats={"value": nats, "low": nats, "high": nats}, perplexity=1.0)


def test_compare_within_judges_each_method_by_its_best_point_within_the_cost_and_the_intervals():
    points = [_point("kfac", 0.9, 18, 0.01), _point("kfac", 0.5, 1, 0.04), _point("kfac", 0.3, 0, 0.20),
              _point("noise", 0.5, 4, 0.03),        # 4/20 overlaps kfac's 1/20 at 0.04
              _point("saliency", 0.5, 19, 0.01),    # 19/20 lies clearly above 1/20
              _point("svd", 0.9, 20, 0.50),         # nothing within 0.05
              _point("magnitude", 0.9, 0, 0.001)]   # 0/20 within the cost: K-FAC is not lower
    frontier = FrontierResult(FrontierOptions(methods=("kfac", "noise", "saliency", "svd", "magnitude")),
                              _point("unedited", 1.0, 20, 0.0), points)
    assert frontier.compare_within(0.05) == {"noise": "on", "saliency": "below", "svd": "beyond the cost",
                                             "magnitude": "on"}
    # at a cost only K-FAC's keep 0.9 point (18/20) meets, magnitude's 0/20 lies clearly under it
    assert frontier.compare_within(0.015)["magnitude"] == "above"
    assert frontier.compare_within(0.0005) == {"kfac": "beyond the cost"}
    with pytest.raises(FrontierError, match="no method 'random'"):
        frontier.compare_within(0.05, reference="random")


def test_bad_frontier_options_are_refused():
    with pytest.raises(FrontierError, match="unknown frontier method"):
        FrontierOptions(methods=("kfac", "shampoo")).validate()
    with pytest.raises(FrontierError, match="keep fractions"):
        FrontierOptions(keep_fractions=(0.5, 1.0)).validate()


def test_frontier_through_the_cli(tmp_path, lm_dir, text_jsonl):
    factors, memorized = factors_and_windows(tmp_path, lm_dir, text_jsonl)
    out = tmp_path / "frontier"
    result = CliRunner().invoke(app, ["frontier", "--model", str(lm_dir), "--factors", str(factors), "--memorized",
                                      str(memorized), "--heldout", str(text_jsonl), "--heldout-seq-len", "16",
                                      "--methods", "kfac,magnitude,noise", "--keep-grid", "0.8,0.4", "--out", str(out),
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "frontier.json").read_text())
    assert [p["method"] for p in data["points"]] == ["kfac", "kfac", "magnitude", "magnitude", "noise", "noise"]
    assert (out / "frontier.png").is_file() and "nats/token" in result.output


def test_an_interrupted_frontier_resumes_at_its_next_point(tmp_path, lm_dir, text_jsonl, monkeypatch):
    from transformers import AutoModelForCausalLM

    import curvedit.diagnostics.frontier as frontier_module
    from curvedit.io import JournalError

    factors, _ = factors_and_windows(tmp_path, lm_dir, text_jsonl)
    model = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    targets = select_targets(model, TargetSpec(preset="mlp-in"))
    windows = [Window([5, 6, 7, 8], [9, 10, 11])]
    heldout = [[i % 20 + 3 for i in range(j, j + 16)] for j in range(4)]
    options = FrontierOptions(methods=("kfac", "noise", "svd"), keep_fractions=(0.9, 0.5), progress=False)
    journal = tmp_path / "frontier.journal.jsonl"
    real, edits = frontier_module.apply_edit, []

    def killed_at_the_fourth_edit(*args):
        edits.append(1)
        if len(edits) == 4:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(frontier_module, "apply_edit", killed_at_the_fourth_edit)
    with pytest.raises(KeyboardInterrupt):
        run_frontier(model, None, factors, targets, windows, heldout, options, journal=journal)
    edits.clear()
    resumed = run_frontier(model, None, factors, targets, windows, heldout, options, journal=journal)
    assert len(edits) == 3 and not journal.exists()  # the three points left
    monkeypatch.setattr(frontier_module, "apply_edit", real)
    whole = run_frontier(model, None, factors, targets, windows, heldout, options)
    assert resumed.to_dict() == whole.to_dict()
    journal.write_text('{"journal": "frontier", "key": "of other amounts"}\n{"method": "kfac"}\n')
    with pytest.raises(JournalError, match="another frontier"):
        run_frontier(model, None, factors, targets, windows, heldout, options, journal=journal)
