"""`curvedit edit` and `curvedit spectrum` from the command line."""

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from curvedit.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def factors_for(tmp_path, lm_dir, text_jsonl):
    out = tmp_path / "factors"
    assert run("collect", "--model", lm_dir, "--data", text_jsonl, "--out", out, "--seq-len", 16,
               "--no-progress").exit_code == 0
    return out


def test_edit_writes_a_loadable_model_changing_only_the_targets(tmp_path, lm_dir, text_jsonl):
    factors = factors_for(tmp_path, lm_dir, text_jsonl)
    out = tmp_path / "edited"
    result = run("edit", "--model", lm_dir, "--factors", factors, "--layers", "1", "--rho", 0.6, "--out", out)
    assert result.exit_code == 0, result.output
    before = AutoModelForCausalLM.from_pretrained(lm_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out).state_dict()
    edited = {"transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight"}
    for name, tensor in after.items():
        assert torch.equal(tensor, before[name]) != (name in edited), name
    ids = [AutoTokenizer.from_pretrained(path)("abc")["input_ids"] for path in (out, lm_dir)]
    assert ids[0] == ids[1]
    manifest = json.loads((out / "curvedit-edit.json").read_text())
    assert manifest["plan"]["method"] == "kfac" and manifest["plan"]["rules"][0]["rho"] == 0.6
    assert manifest["factors"]["model"]["weights_hash"]
    stats = manifest["targets"]["transformer.h.1.mlp.c_fc"]
    assert stats["total"] == 64 * 16 and 0 < stats["kept"] < stats["total"] and stats["mass_kept"] >= 0.6
    assert 0 < stats["rel_change"] < 1


def test_edit_refuses_the_input_directory_an_existing_output_and_bad_rho(tmp_path, lm_dir, text_jsonl):
    factors = factors_for(tmp_path, lm_dir, text_jsonl)
    result = run("edit", "--model", lm_dir, "--factors", factors, "--rho", 0.6, "--out", lm_dir)
    assert result.exit_code == 2 and "input model's directory" in result.output
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("mine")
    result = run("edit", "--model", lm_dir, "--factors", factors, "--rho", 0.6, "--out", tmp_path / "taken")
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (tmp_path / "taken" / "file").read_text() == "mine"
    result = run("edit", "--model", lm_dir, "--factors", factors, "--rho", 1.5, "--out", tmp_path / "x")
    assert result.exit_code == 2 and "must be in (0, 1]" in result.output


def test_edit_with_a_plan_file_and_the_svd_method(tmp_path, lm_dir, text_jsonl):
    factors = factors_for(tmp_path, lm_dir, text_jsonl)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"*.c_fc": 0.5, "*.c_proj": 0.9}))
    result = run("edit", "--model", lm_dir, "--factors", factors, "--plan", plan, "--out", tmp_path / "p")
    assert result.exit_code == 0, result.output
    rules = json.loads((tmp_path / "p" / "curvedit-edit.json").read_text())["targets"]
    assert rules["transformer.h.0.mlp.c_fc"]["rule"]["rho"] == 0.5
    assert rules["transformer.h.0.mlp.c_proj"]["rule"]["rho"] == 0.9
    result = run("edit", "--model", lm_dir, "--method", "svd", "--keep-fraction", 0.5, "--out", tmp_path / "s")
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "s" / "curvedit-edit.json").read_text())["targets"]["transformer.h.0.mlp.c_fc"]
    assert stats["kept"] == 8 and stats["total"] == 16


def test_edit_refuses_factors_of_another_model(tmp_path, lm_dir, text_jsonl):
    factors = factors_for(tmp_path, lm_dir, text_jsonl)
    model = AutoModelForCausalLM.from_pretrained(lm_dir)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(2)
    model.save_pretrained(tmp_path / "other")
    result = run("edit", "--model", tmp_path / "other", "--factors", factors, "--rho", 0.6, "--out", tmp_path / "y")
    assert result.exit_code == 2 and "weights differ" in result.output


def test_spectrum_plots_every_target_and_prints_a_table(tmp_path, lm_dir, text_jsonl):
    factors = factors_for(tmp_path, lm_dir, text_jsonl)
    result = run("spectrum", factors, "--rho", 0.9)
    assert result.exit_code == 0, result.output
    assert "transformer.h.1.mlp.c_proj" in result.output
    pngs = sorted(p.name for p in (factors / "spectrum").glob("*.png"))
    assert pngs == sorted(f"transformer.h.{i}.mlp.{m}.png" for i in (0, 1) for m in ("c_fc", "c_proj"))


def test_edit_in_float32_is_close_to_float64_and_bad_precisions_are_refused(tmp_path, lm_dir, text_jsonl):
    factors = factors_for(tmp_path, lm_dir, text_jsonl)
    common = ("edit", "--model", lm_dir, "--factors", factors, "--layers", "1", "--keep-fraction", 0.5)
    assert run(*common, "--out", tmp_path / "f64").exit_code == 0
    result = run(*common, "--out", tmp_path / "f32", "--eigh-precision", "float32", "--compute-dtype", "float32")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "f32" / "curvedit-edit.json").read_text())["eigh_precision"] == "float32"
    f64 = AutoModelForCausalLM.from_pretrained(tmp_path / "f64").state_dict()
    f32 = AutoModelForCausalLM.from_pretrained(tmp_path / "f32").state_dict()
    for name in ("transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight"):
        torch.testing.assert_close(f32[name], f64[name], rtol=0, atol=1e-4)
    bad = run(*common, "--out", tmp_path / "bad", "--eigh-precision", "half")
    assert bad.exit_code != 0 and "eigh precision must be one of ['float64', 'float32'], got 'half'" in bad.output


def test_a_plan_s_masses_and_a_method_flag_are_merged_before_they_are_checked(tmp_path, lm_dir):
    """--method identity needs masses saliency; here the plan file gives them."""
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"rules": [{"pattern": "*", "keep_fraction": 0.5}], "masses": "saliency"}))
    result = CliRunner().invoke(app, ["edit", "--model", str(lm_dir), "--plan", str(plan), "--method", "identity",
                                      "--out", str(tmp_path / "pruned"), "--no-progress"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "pruned" / "curvedit-edit.json").read_text())
    assert (manifest["plan"]["method"], manifest["plan"]["masses"]) == ("identity", "saliency")

