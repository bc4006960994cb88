"""`curvedit collect` and `curvedit merge` from the command line."""

import json

from typer.testing import CliRunner

from curvedit.cli import app
from curvedit.kfac.factors import load_factors

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_collect_writes_factor_files_and_refuses_to_overwrite(tmp_path, lm_dir, text_jsonl):
    out = tmp_path / "factors"
    result = run("collect", "--model", lm_dir, "--data", text_jsonl, "--out", out, "--seq-len", 16,
                 "--batch-size", 3, "--layers", "1", "--no-progress")
    assert result.exit_code == 0, result.output
    factors = load_factors(out)
    assert list(factors.targets) == ["transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
    assert factors.collection["label_mode"] == "sampled" and factors.collection["seq_len"] == 16
    assert not (out / "checkpoint.json").exists()
    again = run("collect", "--model", lm_dir, "--data", text_jsonl, "--out", out, "--no-progress")
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_collect_errors_are_one_clear_line(tmp_path, lm_dir, text_jsonl):
    result = run("collect", "--model", lm_dir, "--data", text_jsonl, "--out", tmp_path / "f", "--targets", "*.q_proj")
    assert result.exit_code == 2 and "modules that exist" in result.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = run("collect", "--model", lm_dir, "--data", empty, "--out", tmp_path / "g", "--no-progress")
    assert result.exit_code == 2 and "no data" in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    result = run("collect", "--model", lm_dir, "--data", bad, "--out", tmp_path / "h", "--no-progress")
    assert result.exit_code == 2 and "bad.jsonl:2" in result.output


def test_merge_combines_two_runs_position_weighted(tmp_path, lm_dir, text_jsonl):
    rows = text_jsonl.read_text().splitlines()
    parts = []
    for i, row in enumerate(rows):
        data = tmp_path / f"part{i}.jsonl"
        data.write_text(row + "\n")
        out = tmp_path / f"f{i}"
        assert run("collect", "--model", lm_dir, "--data", data, "--out", out, "--labels", "gold",
                   "--seq-len", 16, "--no-progress").exit_code == 0
        parts.append(out)
    result = run("merge", *parts, "--out", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    merged = load_factors(tmp_path / "merged")
    sizes = [load_factors(p).targets["transformer.h.0.mlp.c_fc"].positions for p in parts]
    assert merged.targets["transformer.h.0.mlp.c_fc"].positions == sum(sizes)
    assert len(json.loads((tmp_path / "merged" / "factors.json").read_text())["collection"]["merged_from"]) == 2
