"""The demo world, its training, and an end-to-end smoke run of `curvedit demo`."""

import json
import random

import pytest
import torch
from typer.testing import CliRunner

from curvedit.cli import app
from curvedit.diagnostics.frontier import FRONTIER_METHODS
from curvedit.experiments.demo.train import TrainConfig, build_model, train_demo_model
from curvedit.experiments.demo.world import (
    WorldConfig,
    arithmetic_example,
    build_world,
    evaluation_examples,
    logic_example,
    open_book_example,
    pack,
    quote_split,
    training_lines,
)

SCHEMA = {"memorized_strict", "memorized_loose", "memorized_heldout_strict", "memorized_heldout_loose",
          "memorized_heldout_lev", "quotes_strict", "quotes_loose", "perplexity", "logic", "open_book",
          "facts_common", "facts_rare", "arithmetic"}


def evaluate_left_to_right(expr: str) -> str:
    value = expr[0] == "T"
    for op, operand in zip(expr[1::2], expr[2::2]):
        value = (value and operand == "T") if op == "&" else (value or operand == "T")
    return "T" if value else "F"


def test_generated_answers_are_right():
    rng = random.Random(0)
    for _ in range(200):
        ex = logic_example(rng)
        assert ex.answer == evaluate_left_to_right(ex.prompt[:-1])
        ex = open_book_example(rng)
        pairs = dict(p.split("=") for p in ex.prompt.split(" ?")[0].split())
        assert pairs[ex.prompt.split("?")[1][:-1]] == ex.answer
    assert arithmetic_example(74, 404).prompt == "074+404:" and arithmetic_example(74, 404).answer == "8740"
    assert arithmetic_example(999, 1).answer == "0001"
    assert quote_split('"a b" - name') == ('"a b" - ', "name")


def test_world_is_reproducible_and_its_splits_are_disjoint():
    config = WorldConfig(general_lines=2000)
    one, two = build_world(config), build_world(config)
    assert one.memorized == two.memorized and one.facts == two.facts
    assert not set(one.tune) & set(one.heldout) and len(one.tune) == len(one.heldout) == config.memorized // 2
    lines = training_lines(one, random.Random(0))
    train_pairs = {tuple(map(int, line.split(":")[0].split("+"))) for line in lines
                   if "+" in line and line[0].isdigit()}
    assert len(train_pairs) > 100 and any(a < 10 and b < 10 for a, b in train_pairs)
    assert train_pairs and not train_pairs & one.arithmetic_test_pairs
    tests = evaluation_examples(one, 50, seed=1)
    assert all(tuple(map(int, e.prompt[:-1].split("+"))) in one.arithmetic_test_pairs for e in tests["arithmetic"])
    assert {e.tier for e in tests["facts_rare"]} == {"rare"}
    counts = {s: lines.count(s) for s in one.memorized[:4]}
    assert list(counts.values()) == one.memorized_tiers[:4]


def test_pack_keeps_whole_lines_within_the_window():
    assert list(pack(["abc", "defgh", "ij"], seq_len=8)) == ["abc\n", "defgh\n", "ij\n"]
    assert list(pack(["ab", "cd", "efghij"], seq_len=8)) == ["ab\ncd\n", "efghij\n"]


def test_training_is_deterministic_on_a_few_steps(tmp_path):
    world = WorldConfig(memorized=2, memorized_len=10, repetition_tiers=(2,), quotes=1, quote_repetitions=1,
                        facts_common=1, facts_rare=1, common_repetitions=1, rare_repetitions=1, general_lines=60)
    config = TrainConfig(world=world, hidden=16, layers=1, heads=2, intermediate=32, epochs=1, batch_size=8,
                         warmup_steps=2)
    a = train_demo_model(config, tmp_path / "a", progress=False)
    b = train_demo_model(config, tmp_path / "b", progress=False)
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["model.layers.0.mlp.up_proj.weight"],
                           build_model(config, 60).model.layers[0].mlp.up_proj.weight)
    assert json.loads((a / "curvedit-train.json").read_text())["config_hash"] == config.config_hash()


def test_the_quick_demo_measures_the_headline_only_and_prints_its_stage_table(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--smoke", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(results["variants"]) == {"unedited", "kfac", "svd", "random", "random_ppl"} and not results["full"]
    assert not {"bsn", "converge", "label_seeds", "eigencorrect", "attacks_unedited", "layer_map"} & set(
        results["timings_s"])
    assert "| stage | seconds |" in result.output and "demo --full" in result.output
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "## Recitation" in report and "## Does the edit last?" not in report and "demo --full" in report
    score = results["flat_score"]  # the label-free score is part of the headline
    for other in ("nonmembers", "general"):
        auroc = score[f"vs_{other}"]["auroc"]
        assert 0 <= auroc["low"] <= auroc["value"] <= auroc["high"] <= 1
        assert 0 <= score[f"vs_{other}"]["skipped_at_99_recall"] <= 1
    assert score["n"]["memorized"] > 0 and score["n"]["nonmembers"] > 0 and score["n"]["general"] > 0
    assert "## A label-free memorization score" in report


def test_demo_smoke_run_writes_report_and_results_schema(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--smoke", "--full", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(results["variants"]) == {"unedited", "kfac", "ekfac", "targeted", "step", "svd", "random",
                                        "random_ppl", "bsn"}
    step = results["variants"]["step"]
    assert step["perplexity"] <= max(results["variants"]["kfac"]["perplexity"],
                                     results["variants"]["unedited"]["perplexity"]) * (1 + 1e-9)
    assert step["settings"]["step"]["norm"] >= 0 and "attacks" in step
    for name, row in results["variants"].items():
        assert SCHEMA <= set(row) and "settings" in row, name
        assert all(0 <= row[k] <= 1 for k in SCHEMA - {"perplexity"})
        for key in ("memorized_heldout_loose", "perplexity", "ndcg10", "stress_full", "exact_memorization",
                    "sampled_extraction", "mia_loss", "mia_min_k_plus_plus"):
            interval = row[f"{key}_ci"]
            assert interval["low"] <= row[key] <= interval["high"], (name, key)
    assert results["variants"]["unedited"]["ndcg10"] == 1.0  # the unedited model against its own ranking
    assert set(results["label_seeds"]["per_seed"]) == {"0", "1"}
    assert results["label_seeds"]["per_seed"]["0"]["perplexity"] == results["variants"]["kfac"]["perplexity"]
    assert {"train_or_load", "collect", "sweep", "kfac", "report", "label_seeds"} <= set(results["timings_s"])
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "## Privacy and extraction" in report and "## Spread over label-sampling seeds" in report
    attacks = results["variants"]["kfac"]["attacks"]
    assert [r["step"] for r in attacks["relearn_tune"]] == [0, 2] and [r["bits"] for r in attacks["quantize"]] == [
        None, 8, 4]
    assert attacks["relearn_general"][0]["loose"] == results["variants"]["kfac"]["memorized_heldout_loose"]
    assert "attacks" in results["variants"]["bsn"] and "## Does the edit last?" in report
    assert (tmp_path / "demo" / "durability.png").is_file()
    convergence = results["convergence"]
    assert [r["tokens"] for r in convergence["rows"]] == [1000, 4000] and convergence["gold"] is not None
    assert convergence["rows"][-1]["captured"] == pytest.approx(1.0)
    assert "## How much data do the factors need?" in report and (tmp_path / "demo" / "converge.png").is_file()
    assert "| kfac | " in report and " [" in report  # cells carry intervals
    assert "| kfac |" in report and (tmp_path / "demo" / "retention.png").is_file()
    assert "analysis/bands_layer" in report and "analysis/families.png" in report
    assert (tmp_path / "demo" / "sweep" / "sweep.json").is_file()
    assert (tmp_path / "demo" / "analysis" / "bands.json").is_file()
    assert (tmp_path / "demo" / "analysis" / "families.png").is_file()
    layer_map = results["layer_map"]  # the smoke model's 2 blocks: each alone, no run of three
    assert [p["layers"] for p in layer_map["placements"]] == ["0", "1"] and layer_map["mark"] == "0-1"
    assert "## Where to cut: the layer map" in report and (tmp_path / "demo" / "layer_map.png").is_file()
    assert [p["method"] for p in results["frontier"]["points"]] == list(FRONTIER_METHODS)  # one amount each
    assert "## Is curvature the lever?" in report and (tmp_path / "demo" / "frontier" / "frontier.png").is_file()
