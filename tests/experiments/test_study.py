"""The SmolLM2 study's pipeline end to end on a tiny Llama GGUF (plumbing, seconds)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

from curvedit.evaluate.capabilities import FAMILIES
from curvedit.evaluate.windows import Window
from curvedit.experiments.studies import implanted
from curvedit.experiments.studies.canary_stage import split_halves
from curvedit.experiments.studies.options import StudyError, StudyOptions
from curvedit.experiments.studies.report import write_study_report
from curvedit.experiments.studies.smollm2 import run_study
from curvedit.experiments.studies.status import SeedStatus, estimate_left
from curvedit.experiments.studies.summary import VARIANTS
from curvedit.memorize.implant import ImplantOptions
from tests.gguf_files import write_tiny_llama_gguf
from tests.tiny_models import tiny_llama


def test_halves_split_each_style_evenly():
    windows = [Window([i], [i], source=f"canary:{s}", document=i) for i, s in enumerate("aaaabbbcc")]
    tune, heldout = split_halves(windows, [w.source[-1] for w in windows], seed=0)
    assert sorted(w.document for w in tune + heldout) == list(range(9))
    assert [sum(w.source.endswith(s) for w in tune) for s in "abc"] == [2, 1, 1]


def test_with_no_point_above_the_probe_floor_the_study_takes_the_perplexity_only_choice():
    from curvedit.editing.sweep import SweepGrid, SweepOptions, SweepPoint, SweepResult
    from curvedit.experiments.studies.seed import budget_choice

    baseline = SweepPoint(perplexity=10.0)
    points = [SweepPoint(layers="0", amount_kind="rho", amount=0.5, loose=0.2, perplexity=10.2, excluded="x"),
              SweepPoint(layers="1", amount_kind="rho", amount=0.5, loose=0.1, perplexity=10.4, excluded="x"),
              SweepPoint(layers="2", amount_kind="rho", amount=0.5, loose=0.0, perplexity=12.0, excluded="x")]
    swept = SweepResult(grid=SweepGrid(layers=("0", "1", "2")), options=SweepOptions(), baseline=baseline,
                        points=points, front=[], chosen=None, usable_probes=[]).to_dict()
    assert budget_choice(swept, 1.05) == 1  # the least recall within 1.05x; the third is over the budget
    assert budget_choice(swept, 1.01) is None


def test_the_study_s_sweep_holds_only_the_usable_families_its_floor_names():
    from curvedit.experiments.studies.seed import held_floor

    floor = {"boolean": 0.9, "open_book": 0.9, "facts_common": 0.7}  # boolean is not usable on this model
    assert held_floor(floor, ["open_book", "add_1d", "facts_common"]) == {"open_book": 0.9, "facts_common": 0.7}
    assert held_floor({"*": 0.5, "open_book": 0.9}, ["open_book", "add_1d"]) == {"open_book": 0.9, "add_1d": 0.5}
    assert held_floor(0.6, ["add_1d"]) == {"add_1d": 0.6}
    assert held_floor(floor, ["add_1d"]) is None and held_floor(None, ["add_1d"]) is None


def test_never_implanted_canaries_are_fewer_when_the_prose_passages_do_not_go_round():
    from collections import Counter

    from curvedit.experiments.studies.canary_stage import nonmember_canaries
    from curvedit.memorize.canaries import generate_canaries

    options = StudyOptions()  # 24 canaries, record / code / prose: 8 prose implanted of the 14 passages
    implanted = [c.text for c in generate_canaries(options.canaries, 0, options.styles, options.counts)]
    controls = nonmember_canaries(options, 0, implanted)
    assert Counter(c.style for c in controls) == {"record": 7, "code": 7, "prose": 6}
    assert not {c.text for c in controls} & set(implanted)


def test_study_runs_every_stage_on_a_tiny_gguf_and_reads_its_records_back(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # results.json names what lies below the working directory relative to it
    gguf = write_tiny_llama_gguf(tiny_llama(context=1024), tmp_path / "tiny.gguf")  # few-shot prompts
    options = StudyOptions(
        out=tmp_path / "study", gguf=gguf, seeds=(0,), canaries=8, counts=(2, 4),
        implant=ImplantOptions(prefix_len=8, suffix_len=8, lr=1e-2, max_steps=80, eval_every=20, seq_len=48,
                               general_per_step=2, target_recall=1.0, checkpoint_every=0, preserve="kl"),
        replay_samples=8, probe_floor=0.5, factor_data="mix", paper_layers="middle",
        ppl_sequences=8, factor_tokens=1500, layer_grid=("1", "0-1"), ppl_budget=100.0, bisect_steps=3,
        probe_items=3, bsn_ratios=(0.05,), bsn_epochs=1, batch_size=8, progress=False, beyond_seeds=(0,),
        frontier_keep=(0.5,))
    results = run_study(options, log=lambda _: None)
    seed = results["seeds"][0]
    assert set(seed["variants"]) == {*VARIANTS, "kfac_self_factors", "step", "kfac_strict"}  # + the other factor text
    strict = seed["variants"]["kfac_strict"]  # the least K-FAC edit that brings the tune half to strict <= 5%
    if strict["strict_tune"]["reached"]:
        assert strict["tune"]["strict"] <= 0.05
        assert all(s["strict"] > 0.05 for s in strict["strict_tune"]["steps"] if s["amount"] > strict["strict_tune"][
            "amount"])  # every weaker edit tried left more
    step = seed["variants"]["step"]  # the coherent step stays within K-FAC's perplexity
    assert step["perplexity"] <= seed["variants"]["kfac"]["perplexity"] * 1.001 or step["step"]["norm"] == 0
    assert 0 <= step["step"]["gradient_share_in_block"] <= 1 and step["step"]["norm"] <= 4 * step["step"][
        "deletion_norm"] + 1e-9
    assert "sampled itself" in seed["variants"]["kfac_self_factors"]["note"]
    assert seed["found"]["tune"] >= 1 and seed["found"]["heldout"] >= 1
    assert results["model"]["quantization"] == "F32" and results["model"]["name"] == "tiny"  # the file's own name
    assert seed["implant"]["kl_after"] is not None  # the KL implant replayed the model's own samples
    assert list((options.records / "seed-0").glob("self-samples-*.json"))  # half the factor text: its own samples
    assert [p["layers"] for p in seed["layer_map"]["placements"]] == ["0", "1"]  # the 2-block model's map
    assert (options.out / "seed-0" / "layer_map.png").is_file()
    energy = seed["style_energy"]
    assert {"general", "code", "record", "nonmember"} <= set(energy) and 0 < energy["general"]["mean"] < 1
    assert energy["nonmember"]["n"] == options.canaries
    score = results["summary"]["flat_score"]
    assert score["auroc"]["low"] <= score["auroc"]["value"] <= score["auroc"]["high"]
    assert set(results["base_probes"]) == set(FAMILIES) and all("usable" in v for v in results["base_probes"].values())
    for name in VARIANTS:
        v = seed["variants"][name]
        assert 0 <= v["heldout"]["loose"] <= 1 and v["perplexity"] > 0 and 0 <= v["ndcg10"] <= 1
    assert seed["variants"]["unedited"]["ndcg10"] > 0.999
    unedited = seed["variants"]["unedited"]
    assert unedited["stress_reference"]["n"] == seed["found"]["heldout"]
    assert len(unedited["mia"]["members"]["loss"]) == seed["found"]["heldout"]
    assert len(unedited["mia"]["nonmembers"]["reference"]) == options.canaries  # never-implanted canaries
    intervals = results["summary"]["variants"]["kfac"]["intervals"]
    assert {"heldout_loose", "ppl_ratio", "ndcg10", "stress_full", "sampled_extraction", "mia_min_k_plus_plus"} <= set(
        intervals)
    assert all(i["low"] <= i["value"] <= i["high"] for i in intervals.values())
    report = (options.out / "report.md").read_text()
    assert "## Privacy and extraction" in report and "## What the definition change moved" in report
    beyond = seed["beyond"]
    assert set(beyond["variants"]) == {"ekfac", "targeted"} and set(beyond["attacks"]) == {"unedited", "kfac",
                                                                                            "targeted", "bsn"}
    assert [r["step"] for r in beyond["attacks"]["kfac"]["relearn_tune"]] == [0, 10, 30]
    assert "## Beyond the paper" in report and "## How the edit was chosen" in report
    beyond_part = report.split("## Beyond the paper")[1]  # the targeted edit beside the step, with intervals
    assert "| coherent step from the tune half, K-FAC's ppl |" in beyond_part and "% [" in beyond_part
    assert "## Is curvature the lever?" in report and (options.out / "seed-0" / "frontier" / "frontier.png").is_file()
    assert "**Verdict:**" in report.split("## Is curvature the lever?")[1]
    assert [d["seed"] for d in results["summary"]["implant_drift"]] == [0]
    assert (options.out / "report.md").read_text().count("|") > 50
    assert str(tmp_path) not in (options.out / "results.json").read_text() and results["options"]["out"] == "study"
    again = write_study_report(json.loads((options.out / "results.json").read_text()), tmp_path / "from-file")
    assert again.read_text() == report  # read back from the file, the run writes its own report again
    assert (options.out / "recall_vs_ppl.png").is_file() and (options.out / "seed-0" / "sweep.json").is_file()
    # every stage is cached: a second run reads the same numbers back; without the beyond edits the
    # beyond seed keeps its layer map and frontier
    again = run_study(replace(options, beyond_edits=False), log=lambda _: None)
    assert json.dumps(again["seeds"][0]["variants"], sort_keys=True) == json.dumps(seed["variants"], sort_keys=True)
    assert "beyond" not in again["seeds"][0]
    for part in ("layer_map", "frontier"):
        assert json.dumps(again["seeds"][0][part], sort_keys=True) == json.dumps(seed[part], sort_keys=True)
    # the records alone carry the study to another machine: without the cache (models, factors) a
    # recorded seed is read back without implanting or collecting
    shutil.rmtree(options.cache / "seed-0")
    monkeypatch.setattr(implanted, "implant_seed", lambda *a, **k: pytest.fail("implanted again"))
    monkeypatch.setattr(implanted, "collect_factors", lambda *a, **k: pytest.fail("collected again"))
    moved = run_study(options, log=lambda _: None)
    assert json.dumps(moved["seeds"][0]["variants"], sort_keys=True) == json.dumps(seed["variants"], sort_keys=True)
    monkeypatch.undo()
    # a stage still to run on a model implanted anew that differs from the recorded one stops the
    # study rather than mixing two runs
    record = options.records / "seed-0" / "implant.json"
    stored = json.loads(record.read_text())
    stored["value"]["weights_sha256"] = "0" * 64
    record.write_text(json.dumps(stored))
    (options.records / "seed-0" / "variants" / "svd.json").unlink()
    with pytest.raises(StudyError, match="not the one the records"):
        run_study(options, log=lambda _: None)
    record.unlink()  # later records with no implant record: what they were measured on is unknown
    with pytest.raises(StudyError, match="cannot be checked"):
        run_study(options, log=lambda _: None)


def test_the_base_model_cache_is_keyed_by_the_gguf_s_content_not_its_size(tmp_path):
    from curvedit.experiments.studies.base import prepare_base

    first = write_tiny_llama_gguf(tiny_llama(seed=0), tmp_path / "a.gguf")
    second = write_tiny_llama_gguf(tiny_llama(seed=1), tmp_path / "b.gguf")
    assert first.stat().st_size == second.stat().st_size
    options = StudyOptions(out=tmp_path / "study", gguf=first)
    _, info_a = prepare_base(options, log=lambda _: None)
    _, info_b = prepare_base(StudyOptions(out=tmp_path / "study", gguf=second), log=lambda _: None)
    assert info_a["sha256"] != info_b["sha256"]
    _, again = prepare_base(StudyOptions(out=tmp_path / "study", gguf=second), log=lambda _: None)
    assert again == info_b


def test_the_smollm2_study_file_states_the_study_s_own_settings():
    from dataclasses import replace
    from pathlib import Path

    from curvedit.experiments.studies.config import load_study_config

    path = Path(__file__).parents[2] / "studies" / "smollm2" / "study.toml"
    options = load_study_config(path)
    assert options.out == path.parent / "." and options.config == path
    assert replace(options, out=StudyOptions().out, config=None) == StudyOptions()


@pytest.mark.parametrize("text, message", [
    ("seedz = [0]\n", "unknown field"), ("[implant]\nlearning_rate = 1\n", "unknown \\[implant\\] field"),
    ("seeds = 3\n", "must be a list"), ("ppl_budget = 0.5\n", "perplexity budget"), ("seeds = [\n", "not a valid TOML"),
    ("probe_families = ['add_1d', 'poetry']\n", "poetry"), ("model = 'x'\ngguf = 'y.gguf'\n", "not both"),
    ("canaries = '24'\n", "canaries must be an int"), ("[implant]\nlr = '5e-4'\n", "\\[implant\\] lr must be"),
    ("styles = ['words', 'haiku']\n", "styles must be"), ("canaries = 5\n", "2 per style"),
    ("probe_floor = { poetry = 0.9 }\n", "unknown family 'poetry'"), ("probe_floor = 'high'\n", "probe floor must be"),
    ("probe_floor = { open_book = 1.5 }\n", "probe floor of open_book must be"),
    ("paper_layers = '40-42'\n", "paper_layers: layer group"),
    ("[edit]\nmethod = 'magic'\n", "\\[edit\\] unknown method 'magic'"),
    ("[edit]\nrho = 0.5\n", "unknown \\[edit\\] field"), ("[edit]\nseed = 'one'\n", "\\[edit\\] seed must be"),
    ("compute_dtype = 'float32'\n", "compute_dtype moved into the \\[edit\\] table"),
    ("[edit]\nmethod = 'random'\n", "method, masses and seed belong to each variant"),
    ("[edit]\nseed = 3\n", "drop seed = 3")])
def test_a_bad_study_file_is_refused_by_name(tmp_path, text, message):
    from curvedit.experiments.studies.config import load_study_config
    from curvedit.experiments.studies.options import StudyError

    (tmp_path / "study.toml").write_text(text)
    with pytest.raises(StudyError, match=message):
        load_study_config(tmp_path / "study.toml")


def test_study_run_takes_any_model_and_general_text_from_a_file(tmp_path):
    from typer.testing import CliRunner

    from curvedit.cli import app

    tiny_llama(context=1024).save_pretrained(tmp_path / "model")  # an HF folder, not the SmolLM2 GGUF
    write_tiny_llama_gguf(tiny_llama(context=1024), tmp_path / "t.gguf")
    from curvedit.models import load_model

    load_model(tmp_path / "t.gguf").preprocessor.save_pretrained(tmp_path / "model")
    text = "hello world " * 40
    (tmp_path / "general.jsonl").write_text("".join(json.dumps({"text": text + str(i)}) + "\n" for i in range(60)))
    (tmp_path / "study.toml").write_text(
        'out = "study"\nmodel = "model"\ngeneral = "general.jsonl"\nseeds = [0]\ncanaries = 4\n'
        'styles = ["words", "record"]\ncounts = [2]\n'
        'ppl_sequences = 4\nfactor_tokens = 600\nlayer_grid = ["1"]\nmatrices = ["mlp"]\nppl_budget = 100.0\n'
        'bisect_steps = 2\nprobe_items = 2\nprobe_families = ["add_1d", "copying"]\nbsn_ratios = [0.05]\n'
        'bsn_epochs = 1\nbatch_size = 8\nbeyond_seeds = []\n'
        "[implant]\nprefix_len = 8\nsuffix_len = 8\nlr = 1e-2\nmax_steps = 60\neval_every = 20\nseq_len = 32\n"
        "general_per_step = 2\ntarget_recall = 1.0\ncheckpoint_every = 0\n")
    result = CliRunner().invoke(app, ["study", "run", str(tmp_path / "study.toml"), "--no-progress"])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "study" / "results.json").read_text())
    assert results["data"]["general"].endswith("general.jsonl") and results["model"]["name"] == "model"
    assert set(results["base_probes"]) == {"add_1d", "copying"}
    assert "curvedit study run" in (tmp_path / "study" / "report.md").read_text()
    status = CliRunner().invoke(app, ["study", "status", str(tmp_path / "study.toml")])
    assert status.exit_code == 0 and "| 0 |" in status.stdout and "| done |" in status.stdout
    # records measured on another implant are refused by name through the command line, and kept
    record = tmp_path / "study" / "records" / "seed-0" / "implant.json"
    stored = json.loads(record.read_text())
    stored["value"]["weights_sha256"] = "f" * 64
    record.write_text(json.dumps(stored))
    shutil.rmtree(tmp_path / "study" / "cache" / "seed-0")
    (tmp_path / "study" / "records" / "seed-0" / "variants" / "kfac.json").unlink()
    result = CliRunner().invoke(app, ["study", "run", str(tmp_path / "study.toml"), "--no-progress"])
    assert result.exit_code == 2 and "error:" in result.output and "not the one the records" in result.output
    assert json.loads(record.read_text()) == stored
    status = CliRunner().invoke(app, ["study", "status", str(tmp_path / "study.toml")])
    assert status.exit_code == 0 and "| variants/kfac.json |" in status.stdout  # the next stage to run


def test_the_status_estimates_what_a_seed_lacks_from_the_other_seeds_records():
    done = SeedStatus(seed=0, recorded={"implant.json": 100.0, "variants/kfac.json": 30.0, "beyond.json": 500.0})
    half = SeedStatus(seed=1, recorded={"implant.json": 90.0}, next_record="variants/kfac.json")
    fresh = SeedStatus(seed=2, next_record="implant.json")
    statuses = [done, half, fresh]
    assert estimate_left(half, statuses, beyond=False) == 30.0  # the beyond seed's own stages left out
    assert estimate_left(fresh, statuses, beyond=True) == 630.0
    assert estimate_left(half, [half], beyond=False) is None  # no seed has recorded more
    assert done.recorded_s == 630.0


def test_protected_variants_take_each_band_s_usable_families_and_leave_the_shared_bases_alone():
    from curvedit.data import lm_batches
    from curvedit.experiments.studies.capability_stages import protect_bands, protected_bases, variant_name
    from curvedit.kfac.collect import CollectOptions, collect_factors
    from curvedit.kfac.spectrum import eigenbasis
    from curvedit.kfac.targets import TargetSpec, select_targets
    from tests.tiny_models import tiny_gpt2

    assert protect_bands(["add_1d", "copying", "facts_common", "sub_1d"]) == {
        "arithmetic": ["add_1d", "sub_1d"], "closed-book common": ["facts_common"]}
    assert variant_name("closed-book rare") == "kfac_protect_facts_rare"
    model = tiny_gpt2(vocab=11)
    targets = select_targets(model, TargetSpec(preset="mlp-in"))
    general = collect_factors(model, lm_batches([[1, 2, 3, 4, 5]] * 3, 3, 0), targets,
                              options=CollectOptions(progress=False))
    bases = {t.name: eigenbasis(general.targets[t.name]) for t in targets}
    copies = protected_bases(model, bases, targets, [[6, 7, 8, 9], [9, 8, 7, 6]], pad_id=0, seed=0)
    assert all(b.protect is None for b in bases.values()) and all(c.protect is not None for c in copies.values())


def test_a_protected_edit_is_matched_to_k_fac_s_removal_by_bisecting_its_keep_fraction():
    """Recall falls in steps as less is kept; the match lands on an amount at the target's step."""
    from types import SimpleNamespace

    from curvedit.experiments.studies.seed import match_recall

    state = {"amount": 1.0}

    def apply(amount: float) -> SimpleNamespace:
        state["amount"] = amount
        return SimpleNamespace(stats=[SimpleNamespace(kept=round(100 * amount), total=100)],
                               undo=lambda: state.update(amount=1.0))

    def recall() -> float:  # 1.0 above keep 0.7, 0.5 down to 0.3, 0.0 below
        return 1.0 if state["amount"] > 0.7 else 0.5 if state["amount"] > 0.3 else 0.0

    matched = match_recall(apply, recall, 0.5, steps=8)
    assert matched["reached"] == 0.5 and 0.3 < matched["amount"] <= 0.7 and state["amount"] == 1.0
    assert [s["recall"] for s in matched["steps"]][-1] == 0.5  # the exact hit ends the search
    assert match_recall(apply, recall, 0.0, steps=8)["amount"] <= 0.3
