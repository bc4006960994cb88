"""What must never give a silently wrong result: resumes that mix runs, torn writes,
degenerate selections, plan precedence, duplicate merges, unverifiable factors."""

from __future__ import annotations

import json
import os

import pytest
import torch

import curvedit.io as io_module
from curvedit.data import lm_batches
from curvedit.editing.edit import EditError, EditPlan, EditRule, apply_edit, svd_truncate
from curvedit.kfac.collect import CollectError, CollectOptions, collect_factors
from curvedit.kfac.factors import (
    FactorError,
    TargetFactors,
    check_factors_match,
    load_factors,
    merge_factors,
    save_factors,
)
from curvedit.kfac.spectrum import SelectionError, eigenbasis, select_by_count, select_by_mass
from curvedit.kfac.targets import TargetSpec, select_targets
from tests.helpers import Interrupt, interrupted
from tests.tiny_models import tiny_gpt2

SEQS = [[1, 2, 3, 4, 5], [3, 4, 5, 6, 7, 8, 9], [2, 2, 7], [5, 1, 4], [9, 8, 7, 6], [1, 1, 2, 3]]
OTHER = [[1, 2, 3, 4, 6], [3, 4, 5, 6, 7, 8, 9], [2, 2, 7], [5, 1, 4], [9, 8, 7, 6], [1, 1, 2, 3]]


def options(tmp_path, **changes) -> CollectOptions:
    base = dict(label_mode="sampled", seed=7, progress=False, checkpoint_dir=tmp_path, checkpoint_every=2,
                description="corpus.jsonl", extra={"seq_len": 512, "batch_size": 1, "max_tokens": None})
    return CollectOptions(**{**base, **changes})


def interrupted_run(tmp_path, model):
    targets = select_targets(model, TargetSpec(preset="mlp"))
    with pytest.raises(Interrupt):
        collect_factors(model, interrupted(list(lm_batches(SEQS, 1, 0)), after=5), targets,
                        options=options(tmp_path))
    return targets


@pytest.mark.parametrize("change, named", [
    (dict(description="other.jsonl"), "data: checkpoint 'corpus.jsonl', now 'other.jsonl'"),
    (dict(extra={"seq_len": 256, "batch_size": 1, "max_tokens": None}), "setting seq_len"),
    (dict(extra={"seq_len": 512, "batch_size": 2, "max_tokens": None}), "setting batch_size"),
    (dict(extra={"seq_len": 512, "batch_size": 1, "max_tokens": 20}), "setting max_tokens"),
    (dict(label_mode="gold"), "label_mode"),
])
def test_resume_refuses_other_settings_naming_what_differs(tmp_path, gpt2, change, named):
    targets = interrupted_run(tmp_path, gpt2)
    with pytest.raises(CollectError, match=named):
        collect_factors(gpt2, list(lm_batches(SEQS, 1, 0)), targets, options=options(tmp_path, resume=True, **change))


def test_resume_refuses_another_model(tmp_path, gpt2):
    interrupted_run(tmp_path, gpt2)
    other = tiny_gpt2(seed=3)
    with pytest.raises(CollectError, match="model weights"):
        collect_factors(other, list(lm_batches(SEQS, 1, 0)), select_targets(other, TargetSpec(preset="mlp")),
                        options=options(tmp_path, resume=True))


def test_resume_refuses_other_data_under_the_same_description(tmp_path, gpt2):
    targets = interrupted_run(tmp_path, gpt2)
    with pytest.raises(CollectError, match="first 4 batches read now differ"):
        collect_factors(gpt2, list(lm_batches(OTHER, 1, 0)), targets, options=options(tmp_path, resume=True))
    with pytest.raises(CollectError, match="data ends after 3 batches"):
        collect_factors(gpt2, list(lm_batches(SEQS[:3], 1, 0)), targets, options=options(tmp_path, resume=True))


def test_a_kill_inside_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, gpt2, monkeypatch):
    targets = select_targets(gpt2, TargetSpec(preset="mlp"))
    batches = list(lm_batches(SEQS, 1, 0))
    whole = collect_factors(gpt2, batches, targets, options=options(None))
    real_replace, calls = os.replace, []

    def dies_on_second_checkpoint(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the temporary file is written, the rename never happens
            raise Interrupt
        real_replace(src, dst)

    monkeypatch.setattr(io_module.os, "replace", dies_on_second_checkpoint)
    with pytest.raises(Interrupt):
        collect_factors(gpt2, batches, targets, options=options(tmp_path))
    monkeypatch.setattr(io_module.os, "replace", real_replace)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.safetensors"]  # no temporary file left
    resumed = collect_factors(gpt2, batches, targets, options=options(tmp_path, resume=True))
    for name, tf in whole.targets.items():
        assert resumed.targets[name].positions == tf.positions
        torch.testing.assert_close(resumed.targets[name].A, tf.A, rtol=1e-6, atol=1e-7)


def test_a_kill_between_tensors_and_json_is_refused_on_load(tmp_path, gpt2, monkeypatch):
    targets = select_targets(gpt2, TargetSpec(preset="mlp"))
    first = collect_factors(gpt2, list(lm_batches(SEQS, 2, 0)), targets, options=options(None))
    save_factors(first, tmp_path)
    second = collect_factors(gpt2, list(lm_batches(SEQS[:3], 2, 0)), targets, options=options(None))
    import curvedit.kfac.factors as factors_module

    def killed(*_args, **_kw):
        raise Interrupt

    monkeypatch.setattr(factors_module, "write_json", killed)
    with pytest.raises(Interrupt):
        save_factors(second, tmp_path)  # new tensors, old factors.json
    monkeypatch.undo()
    with pytest.raises(FactorError, match="disagrees with the description stored in factors.safetensors"):
        load_factors(tmp_path)
    (tmp_path / "factors.json").unlink()  # the tensors' own description is complete
    loaded = load_factors(tmp_path)
    name = targets[0].name
    assert loaded.targets[name].positions == second.targets[name].positions
    assert torch.equal(loaded.targets[name].A, second.targets[name].A)


def test_a_hand_edited_json_cannot_pass_for_another_model(tmp_path, gpt2):
    targets = select_targets(gpt2, TargetSpec(preset="mlp"))
    save_factors(collect_factors(gpt2, list(lm_batches(SEQS, 2, 0)), targets, options=options(None)), tmp_path)
    meta = json.loads((tmp_path / "factors.json").read_text())
    for info in meta["targets"].values():
        info["weight_sha256"] = ""
    (tmp_path / "factors.json").write_text(json.dumps(meta))
    with pytest.raises(FactorError, match="disagrees"):
        load_factors(tmp_path)


def test_factors_without_weight_hash_are_refused(gpt2):
    targets = select_targets(gpt2, TargetSpec(preset="mlp"))
    factors = collect_factors(gpt2, list(lm_batches(SEQS, 2, 0)), targets, options=options(None))
    factors.targets[targets[0].name].weight_sha256 = ""
    with pytest.raises(FactorError, match="carry no weight hash"):
        check_factors_match(factors, targets)
    check_factors_match(factors, targets, check_weights=False)


def test_merging_the_same_factors_twice_is_refused(gpt2):
    targets = select_targets(gpt2, TargetSpec(preset="mlp"))
    part = collect_factors(gpt2, list(lm_batches(SEQS, 2, 0)), targets, options=options(None))
    with pytest.raises(FactorError, match="parts 0 and 1 are the same factors"):
        merge_factors([part, part])


def test_sequences_longer_than_the_context_window_are_refused(gpt2):
    targets = select_targets(gpt2, TargetSpec(preset="mlp"))
    long_seq = [[1 + i % 9 for i in range(40)]]  # the tiny GPT-2 has 32 positions
    with pytest.raises(CollectError, match="40 tokens are longer than the model's context window of 32"):
        collect_factors(gpt2, list(lm_batches(long_seq, 1, 0)), targets, options=options(None))


def test_degenerate_factors_and_empty_selections_are_refused():
    zero = torch.zeros(4, dtype=torch.float64)
    ones = torch.ones(3, dtype=torch.float64)
    with pytest.raises(SelectionError, match="degenerate factors"):
        select_by_mass(zero, ones, 0.5)
    with pytest.raises(SelectionError, match="degenerate factors"):
        select_by_count(ones, zero, 0.5)
    with pytest.raises(SelectionError, match="keeps no component"):
        select_by_count(torch.tensor([2.0, 1.0]), torch.tensor([3.0, 1.0]), 0.1)
    with pytest.raises(SelectionError, match="keeps no singular value"):
        svd_truncate(torch.randn(4, 3, dtype=torch.float64), EditRule(keep_fraction=0.1))


def test_an_edit_on_degenerate_factors_leaves_the_model_untouched(gpt2):
    targets = select_targets(gpt2, TargetSpec(preset="mlp"))
    d_out, d_in = targets[0].shape_oi
    basis = eigenbasis(TargetFactors(A=torch.zeros(d_in, d_in, dtype=torch.float64),
                                     G=torch.eye(d_out, dtype=torch.float64), positions=1))
    before = targets[0].module.weight.detach().clone()
    with pytest.raises(SelectionError, match="degenerate"):
        apply_edit(targets[:1], EditPlan([EditRule(rho=0.5)]), {targets[0].name: basis})
    assert torch.equal(targets[0].module.weight, before)


def test_plan_file_values_win_and_conflicts_are_refused(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"rules": [{"pattern": "*", "keep_fraction": 0.5}], "method": "svd", "seed": 3}))
    plan = EditPlan.from_json(path, method=None, seed=None)
    assert (plan.settings.method, plan.settings.seed) == ("svd", 3)
    assert EditPlan.from_json(path, method="svd", compute_dtype="float32").settings.compute_dtype == "float32"
    with pytest.raises(EditError, match="sets method='svd' but 'kfac' was also given"):
        EditPlan.from_json(path, method="kfac")
    for bad in ("{not json", "[1, 2]", '{"*": "half"}', '{"rules": [{"pattern": "*", "rho": 0.5, "x": 1}]}',
                '{"rules": [], "colour": 1}'):
        path.write_text(bad)
        with pytest.raises(EditError):
            EditPlan.from_json(path)


def test_token_ids_outside_the_vocabulary_are_refused(gpt2):
    targets = select_targets(gpt2, TargetSpec(preset="mlp"))  # vocabulary of 11 ids
    with pytest.raises(CollectError, match="token id 11 is outside the model's vocabulary of 11 ids"):
        collect_factors(gpt2, list(lm_batches([[1, 2, 11, 3]], 1, 0)), targets, options=options(None))


def test_bsn_refuses_a_nan_learning_rate():
    from curvedit.editing.balanced_subnet import BSNError, BSNOptions

    for bad in (dict(lr=float("nan")), dict(lr=float("inf")), dict(weight_decay=float("nan"))):
        with pytest.raises(BSNError):
            BSNOptions(**bad).validate()


def test_atomic_writes_give_files_the_mode_a_plain_open_would(tmp_path):
    import os

    import torch

    from curvedit.io import write_json, write_safetensors

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    expected = plain.stat().st_mode & 0o777
    write_json(tmp_path / "a.json", {"a": 1})
    write_safetensors(tmp_path / "t.safetensors", {"w": torch.zeros(2)})
    for name in ("a.json", "t.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name
    old = os.umask(0o077)
    try:
        write_json(tmp_path / "private.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o600


def test_a_second_writer_of_one_output_is_refused_while_the_first_holds_it(lm_dir, text_jsonl, tmp_path):
    from typer.testing import CliRunner

    from curvedit.cli import app
    from curvedit.cli.common import lock_output, release_outputs

    out = tmp_path / "factors"
    args = ["collect", "--model", str(lm_dir), "--data", str(text_jsonl), "--out", str(out), "--seq-len", "16",
            "--no-progress"]
    lock_output(out)  # stands for another run in the middle of writing `out`
    try:
        busy = CliRunner().invoke(app, args)
    finally:
        release_outputs()
    assert busy.exit_code == 2 and "being written by another curvedit run" in busy.output
    assert not out.exists()
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    again = CliRunner().invoke(app, args + ["--overwrite"])  # the first run released its lock when it ended
    assert again.exit_code == 0, again.output


@pytest.mark.parametrize("command", [["demo", "--smoke"], ["study", "smollm2", "--seeds", "0"]])
def test_demo_and_study_refuse_to_replace_a_user_s_report_in_their_folder(tmp_path, command):
    from typer.testing import CliRunner

    from curvedit.cli import app

    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.md").write_text("my own notes\n")
    result = CliRunner().invoke(app, [*command, "--out", str(out), "--no-progress"])
    assert result.exit_code == 2 and "curvedit did not write" in result.output and "--overwrite" in result.output
    assert (out / "report.md").read_text() == "my own notes\n" and sorted(p.name for p in out.iterdir()) == [
        "report.md"]


def test_a_temporary_file_left_by_a_killed_write_neither_blocks_the_folder_nor_stays(lm_dir, text_jsonl, tmp_path):
    import tempfile

    from typer.testing import CliRunner

    from curvedit.cli import app

    out = tmp_path / "factors"
    out.mkdir()
    fd, leftover = tempfile.mkstemp(dir=out, prefix=".checkpoint.safetensors.", suffix=".tmp")  # as io._atomic
    os.close(fd)
    (out / ".notes.tmp").write_text("a user's hidden file")  # not one of curvedit's: kept, and the folder is taken
    args = ["collect", "--model", str(lm_dir), "--data", str(text_jsonl), "--out", str(out), "--seq-len", "16",
            "--no-progress"]
    taken = CliRunner().invoke(app, args)
    assert taken.exit_code == 2 and ".notes.tmp" in taken.output
    (out / ".notes.tmp").unlink()
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    assert not os.path.exists(leftover) and (out / "factors.safetensors").is_file()


def test_a_json_file_gives_its_writer_s_key_order_back(tmp_path):
    import json

    from curvedit.io import write_json

    data = {"unedited": 1, "kfac": {"z": 1, "a": 2}, "bsn": [{"y": 0, "b": 1}]}
    write_json(tmp_path / "r.json", data)
    back = json.loads((tmp_path / "r.json").read_text())
    assert back == data and list(back) == ["unedited", "kfac", "bsn"] and list(back["kfac"]) == ["z", "a"]
    assert list(back["bsn"][0]) == ["y", "b"]
