"""The find-memorized, evaluate and report commands, end to end on the tiny trained model."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from curvedit.cli import app
from tests.reciter import MEMORIZED, PREFIX, SUFFIX, write_workspace

runner = CliRunner()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved model, a corpus, held-out text and a tasks folder."""
    return write_workspace(tmp_path_factory.mktemp("cli"))


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_find_evaluate_report(workspace, tmp_path):
    model, mem = workspace / "model", tmp_path / "mem.jsonl"
    found = invoke("find-memorized", "--model", model, "--data", workspace / "corpus.jsonl", "--prefix", PREFIX,
                   "--suffix", SUFFIX, "--out", mem)
    assert found.exit_code == 0, found.output
    assert "8 windows examined" in found.output and "4 memorized" in found.output
    assert [json.loads(line)["suffix"] for line in mem.read_text().splitlines()] == [t[PREFIX:] for t in MEMORIZED]

    base = tmp_path / "base.json"
    evaluated = invoke("evaluate", "--model", model, "--reference", model, "--memorized", mem,
                       "--heldout", workspace / "heldout.jsonl", "--heldout-seq-len", 32,
                       "--tasks", workspace / "tasks",
                       "--stress", "filler", "--left-extend", "4", "--right-shift", "3", "--name", "base",
                       "--out", base)
    assert evaluated.exit_code == 0, evaluated.output
    results = json.loads(base.read_text())
    metrics = results["metrics"]
    assert metrics["recitation"]["mem"]["strict"] == 1.0
    assert metrics["ndcg"]["ndcg@10"] == pytest.approx(1.0)  # the model against itself
    assert metrics["perplexity"]["perplexity"] > 1.0
    assert metrics["tasks"]["recall"]["accuracy"] == 1.0
    assert set(metrics["stress"]["mem"]) == {"original", "left_extend_4", "right_shift_3"}
    assert results["config"]["name"] == "base" and results["details"] == "base.details.jsonl"
    details = [json.loads(line) for line in (tmp_path / "base.details.jsonl").read_text().splitlines()]
    assert [d["metric"] for d in details] == ["recitation"] * 4 + ["extraction"] * 4 + ["task"] * 4

    again = invoke("evaluate", "--model", model, "--memorized", mem, "--stress", "none", "--out", base)
    assert again.exit_code == 2 and "--overwrite" in again.output
    second = tmp_path / "second.json"
    assert invoke("evaluate", "--model", model, "--memorized", mem, "--stress", "none", "--name", "second",
                  "--out", second).exit_code == 0

    report_dir = tmp_path / "report"
    reported = invoke("report", base, second, "--out", report_dir)
    assert reported.exit_code == 0, reported.output
    markdown = (report_dir / "report.md").read_text()
    assert "Reference: **base**" in markdown
    assert "| recitation/mem/strict | 1 [0.5101, 1] | 1 [0.5101, 1] ≈ |" in markdown  # Wilson at 4 of 4, overlapping
    assert "| recitation/mem/strict | 100.0% |" in markdown  # retention of the second run
    assert "<table>" in (report_dir / "report.html").read_text()
    assert (report_dir / "recitation.png").read_bytes()[:4] == b"\x89PNG"
    assert {"perplexity.png", "ndcg.png", "tasks.png", "stress.png"} <= {p.name for p in report_dir.iterdir()}
    refused = invoke("report", base, second, "--out", report_dir)
    assert refused.exit_code == 2 and "--overwrite" in refused.output
    by_name = invoke("report", base, second, "--out", report_dir, "--reference-name", "second", "--overwrite")
    assert by_name.exit_code == 0 and "Reference: **second**" in (report_dir / "report.md").read_text()


def test_errors_are_reported_without_a_traceback(workspace, tmp_path):
    bad = tmp_path / "tasks"
    bad.mkdir()
    (bad / "broken.jsonl").write_text('{"type": "generate", "prompt": "a", "answer": "b"}\n{"type": "choice"}\n')
    result = invoke("evaluate", "--model", workspace / "model", "--tasks", bad, "--out", tmp_path / "r.json")
    assert result.exit_code == 2 and "broken.jsonl:2:" in result.output
    too_long = invoke("find-memorized", "--model", workspace / "model", "--data", workspace / "corpus.jsonl",
                      "--prefix", 60, "--suffix", 8, "--out", tmp_path / "m.jsonl")
    assert too_long.exit_code == 2 and "context window of 64" in too_long.output
    nothing = invoke("evaluate", "--model", workspace / "model", "--out", tmp_path / "r.json")
    assert nothing.exit_code == 2 and "nothing to evaluate" in nothing.output


def test_evaluate_reports_reference_stress_privacy_and_intervals(workspace, tmp_path):
    model, mem = workspace / "model", tmp_path / "mem.jsonl"
    assert invoke("find-memorized", "--model", model, "--data", workspace / "corpus.jsonl", "--prefix", PREFIX,
                  "--suffix", SUFFIX, "--out", mem).exit_code == 0
    out = tmp_path / "r.json"
    done = invoke("evaluate", "--model", model, "--reference", model, "--memorized", mem,
                  "--heldout", workspace / "heldout.jsonl", "--heldout-seq-len", 32,
                  "--mia", workspace / "heldout.jsonl",
                  "--stress-t", 4, "--samples", 10, "--temperature", 0.5, "--out", out, "--no-progress")
    assert done.exit_code == 0, done.output
    results = json.loads(out.read_text())
    metrics = results["metrics"]
    assert results["config"]["stress_test"] == "reference"
    stress = metrics["stress"]["mem"]["reference"]
    assert (stress["n"], stress["t"], stress["include_original"]) == (4, 4, False)
    assert stress["prompts"] == 4 * (4 + (PREFIX - 4 - 1))  # per window: 4 extensions, truncations to 5..15 tokens
    assert stress["mean_stress"] >= SUFFIX - 1  # the prompt extended by one suffix token recites the other 11
    assert stress["mean_original"] == SUFFIX
    extraction = metrics["extraction"]["mem"]
    assert extraction["exact_memorization"] == 1.0 and extraction["extraction_strength"] == 1.0
    assert 0 < extraction["sample_probability"] <= extraction["sampled_extraction"] <= 1
    mia = metrics["mia"]["mem"]
    assert (mia["members"], mia["nonmembers"]) == (4, 4)
    assert set(mia) >= {"loss", "zlib", "min_k", "min_k_plus_plus", "reference"}
    assert mia["loss"]["auroc"] == 1.0  # memorized windows have far lower loss than unseen text
    assert mia["reference"]["auroc"] == 0.5  # the model against itself: every difference is 0
    assert metrics["ndcg"]["gain"] == "rank" and "relevance k+1-r" in metrics["ndcg"]["definition"]
    for key in ("strict_ci", "loose_ci", "avg_normalized_distance_ci"):
        assert metrics["recitation"]["mem"][key]["n"] == 4
    ppl = metrics["perplexity"]
    assert ppl["perplexity_ci"]["low"] <= ppl["perplexity"] <= ppl["perplexity_ci"]["high"]
    assert ppl["perplexity_ci"]["n"] == ppl["sequences"]
