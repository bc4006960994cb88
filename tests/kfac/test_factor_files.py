"""Factor files: round trip, refusal of wrong-model factors, merge, resume, packing."""

import json

import pytest
import torch

from curvedit.chartok import build_char_tokenizer
from curvedit.data import Record, lm_batches, pad_batch, token_sequences
from curvedit.kfac.collect import CollectError, CollectOptions, collect_factors, read_checkpoint_meta
from curvedit.kfac.factors import (
    FactorError,
    check_factors_match,
    load_factors,
    merge_factors,
    model_identity,
    save_factors,
    tensor_sha256,
)
from curvedit.kfac.targets import TargetSpec, select_targets
from tests.helpers import Interrupt, interrupted
from tests.tiny_models import tiny_gpt2, tiny_olmo2

SEQS = [[1, 2, 3, 4, 5], [3, 4, 5, 6, 7, 8, 9], [2, 2, 7], [5, 1, 4], [9, 8, 7, 6], [1, 1, 2, 3]]


def collect(model, seqs, label_mode="gold", batch_size=2, **kw):
    targets = select_targets(model, TargetSpec(preset="mlp"))
    options = CollectOptions(label_mode=label_mode, progress=False, **kw)
    return collect_factors(model, list(lm_batches(seqs, batch_size, 0)), targets, options=options), targets


def test_save_load_round_trip_keeps_tensors_and_metadata(tmp_path, gpt2):
    factors, targets = collect(gpt2, SEQS)
    save_factors(factors, tmp_path)
    meta = json.loads((tmp_path / "factors.json").read_text())
    assert meta["format_version"] == 2 and meta["collection"]["label_mode"] == "gold"
    assert meta["targets"]["transformer.h.0.mlp.c_fc"] == {
        "d_in": 16, "d_out": 64, "positions": sum(len(s) - 1 for s in SEQS), "transposed": True,
        "weight_sha256": factors.targets["transformer.h.0.mlp.c_fc"].weight_sha256,
        "sha256": {"A": tensor_sha256(factors.targets["transformer.h.0.mlp.c_fc"].A),
                   "G": tensor_sha256(factors.targets["transformer.h.0.mlp.c_fc"].G)}}
    assert meta["model"] == model_identity(gpt2, targets, gpt2.config._name_or_path or "GPT2LMHeadModel")
    loaded = load_factors(tmp_path)
    for name, tf in factors.targets.items():
        assert torch.equal(loaded.targets[name].A, tf.A) and torch.equal(loaded.targets[name].G, tf.G)
    check_factors_match(loaded, targets)


def test_factors_of_another_model_are_refused_with_what_differs(tmp_path, gpt2):
    factors, _ = collect(gpt2, SEQS)
    other_weights = select_targets(tiny_gpt2(seed=1), TargetSpec(preset="mlp"))
    with pytest.raises(FactorError, match="transformer.h.0.mlp.c_fc: weights differ"):
        check_factors_match(factors, other_weights)
    other_arch = select_targets(tiny_olmo2(), TargetSpec(preset="mlp"))
    with pytest.raises(FactorError, match="model.layers.0.mlp.gate_proj: no factors"):
        check_factors_match(factors, other_arch)
    wider = tiny_gpt2()
    wider_targets = select_targets(wider, TargetSpec(preset="mlp"))
    bad = load_factors(save_factors(factors, tmp_path))
    bad.targets["transformer.h.0.mlp.c_fc"].A = torch.zeros(3, 3)
    expected = r"model weight is \(d_out=64, d_in=16\), factors are for \(d_out=64, d_in=3\)"
    with pytest.raises(FactorError, match=expected):
        check_factors_match(bad, wider_targets)


def test_a_directory_without_factors_is_refused(tmp_path):
    with pytest.raises(FactorError, match="not a factor directory"):
        load_factors(tmp_path)


def test_merge_of_disjoint_shards_equals_one_run_on_all_data(gpt2):
    whole, _ = collect(gpt2, SEQS, accumulate_dtype="float64")
    shards = [collect(gpt2, part, accumulate_dtype="float64")[0] for part in (SEQS[:2], SEQS[2:5], SEQS[5:])]
    merged = merge_factors(shards)
    for name, tf in whole.targets.items():
        assert merged.targets[name].positions == tf.positions
        torch.testing.assert_close(merged.targets[name].A, tf.A, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(merged.targets[name].G, tf.G, rtol=1e-10, atol=1e-15)


def test_merge_refuses_other_models_and_label_modes(gpt2):
    ours, _ = collect(gpt2, SEQS[:2])
    with pytest.raises(FactorError, match="different model weights"):
        merge_factors([ours, collect(tiny_gpt2(seed=5), SEQS[2:])[0]])
    with pytest.raises(FactorError, match="label mode"):
        merge_factors([ours, collect(gpt2, SEQS[2:], label_mode="sampled")[0]])


def test_resume_after_interruption_gives_the_uninterrupted_factors(tmp_path, gpt2):
    targets = select_targets(gpt2, TargetSpec(preset="mlp"))
    batches = list(lm_batches(SEQS, 1, 0))
    options = dict(label_mode="sampled", seed=7, progress=False, checkpoint_dir=tmp_path, checkpoint_every=2)
    whole = collect_factors(gpt2, batches, targets, options=CollectOptions(**{**options, "checkpoint_dir": None}))
    with pytest.raises(Interrupt):
        collect_factors(gpt2, interrupted(batches, after=5), targets, options=CollectOptions(**options))
    assert read_checkpoint_meta(tmp_path / "checkpoint.safetensors")["batches_done"] == 4
    resumed = collect_factors(gpt2, batches, targets, options=CollectOptions(**options, resume=True))
    for name, tf in whole.targets.items():
        assert resumed.targets[name].positions == tf.positions
        torch.testing.assert_close(resumed.targets[name].A, tf.A, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(resumed.targets[name].G, tf.G, rtol=1e-6, atol=1e-9)


def test_resume_refuses_a_checkpoint_made_with_other_settings(tmp_path, gpt2):
    targets = select_targets(gpt2, TargetSpec(preset="mlp"))
    batches = list(lm_batches(SEQS, 1, 0))
    collect_factors(gpt2, batches, targets, options=CollectOptions(progress=False, seed=1, checkpoint_dir=tmp_path,
                                                                  checkpoint_every=1))
    with pytest.raises(CollectError, match="another run .*seed: checkpoint 1, now 2"):
        collect_factors(gpt2, batches, targets, options=CollectOptions(progress=False, seed=2, checkpoint_dir=tmp_path,
                                                                      resume=True))


def test_text_is_packed_into_windows_and_equals_the_same_windows_given_as_ids():
    tokenizer = build_char_tokenizer("abcdefgh ")
    records = [Record(text="abc defg", input_ids=None, source="s", index=0),
               Record(text="hhh", input_ids=None, source="s", index=1)]
    packed = list(token_sequences(records, tokenizer, seq_len=4))
    flat = tokenizer("abc defg", add_special_tokens=False)["input_ids"] + [1] + \
        tokenizer("hhh", add_special_tokens=False)["input_ids"] + [1]
    assert packed == [flat[0:4], flat[4:8], flat[8:12], flat[12:]]
    model = tiny_gpt2(vocab=len(tokenizer))
    from_text, _ = collect(model, packed)
    as_ids = [Record(text=None, input_ids=seq, source="s", index=i) for i, seq in enumerate(packed)]
    from_ids, _ = collect(model, list(token_sequences(as_ids, None, seq_len=4)))
    for name in from_text.targets:
        assert torch.equal(from_text.targets[name].G, from_ids.targets[name].G)


def test_id_rows_are_cut_never_merged_and_the_token_budget_holds():
    rows = [Record(text=None, input_ids=list(range(1, 9)), source="s", index=0),
            Record(text=None, input_ids=[3, 4], source="s", index=1)]
    assert list(token_sequences(rows, None, seq_len=5)) == [[1, 2, 3, 4, 5], [3, 4]]
    assert list(token_sequences(rows, None, seq_len=5, max_tokens=6)) == [[1, 2, 3, 4, 5], [3]]


def test_padding_is_excluded_so_batch_size_and_padding_side_do_not_matter(gpt2):
    targets = select_targets(gpt2, TargetSpec(preset="mlp"))
    runs = [collect_factors(gpt2, [pad_batch(SEQS[i:i + bs], 0, side) for i in range(0, len(SEQS), bs)], targets,
                            options=CollectOptions(label_mode="gold", progress=False, accumulate_dtype="float64"))
            for bs, side in [(1, "right"), (6, "right"), (4, "left")]]
    for run in runs[1:]:
        for name, tf in runs[0].targets.items():
            torch.testing.assert_close(run.targets[name].A, tf.A, rtol=1e-10, atol=1e-13)
            torch.testing.assert_close(run.targets[name].G, tf.G, rtol=1e-10, atol=1e-15)


def _rewrite_tensor(folder, key, change):
    """Change one tensor of a factor file in place, keeping its header (a tampered file)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = folder / "factors.safetensors"
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    tensors[key] = change(tensors[key])
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize("change, message", [
    (lambda a: a[[1, 0] + list(range(2, a.shape[0]))][:, [1, 0] + list(range(2, a.shape[0]))], "checksum"),
    (lambda a: a[[1, 0] + list(range(2, a.shape[0]))], "checksum"),
    (lambda a: a.flatten().index_put_((torch.tensor([5]),), torch.tensor(7.0, dtype=a.dtype)).view_as(a), "checksum")])
def test_a_factor_tensor_altered_under_an_intact_header_is_refused(tmp_path, gpt2, change, message):
    factors, _ = collect(gpt2, SEQS)
    save_factors(factors, tmp_path)
    _rewrite_tensor(tmp_path, "transformer.h.0.mlp.c_fc.A", change)
    with pytest.raises(FactorError, match=message):
        load_factors(tmp_path)


def test_without_checksums_an_asymmetric_factor_is_still_refused(tmp_path, gpt2):
    factors, _ = collect(gpt2, SEQS)
    save_factors(factors, tmp_path)
    header = json.loads((tmp_path / "factors.json").read_text())
    for info in header["targets"].values():
        info.pop("sha256")
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tmp_path / "factors.safetensors"), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = dict(handle.metadata())
    metadata["curvedit"] = json.dumps(header, sort_keys=True)
    a = tensors["transformer.h.0.mlp.c_fc.A"]
    tensors["transformer.h.0.mlp.c_fc.A"] = a[[1, 0] + list(range(2, a.shape[0]))]  # rows swapped, not columns
    save_file(tensors, str(tmp_path / "factors.safetensors"), metadata=metadata)
    (tmp_path / "factors.json").write_text(json.dumps(header))
    with pytest.raises(FactorError, match="not symmetric"):
        load_factors(tmp_path)
