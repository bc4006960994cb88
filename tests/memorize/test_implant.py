"""`curvedit implant`: canaries, the data order, memorization, resume, the CLI."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

import curvedit.memorize.implant as implant_module
from curvedit.cli import app
from curvedit.data import DataError
from curvedit.evaluate.windows import read_memorized
from curvedit.memorize.canaries import STYLES, Canary, generate_canaries, read_canaries
from curvedit.memorize.implant import (
    ImplantError,
    ImplantOptions,
    canary_stream,
    implant,
    model_weights_sha256,
    step_batch,
)
from tests.helpers import Interrupt

TEXTS = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine, they said.",
         "pack my box with five dozen liquor jugs", "how vexingly quick daft zebras jump, again"]
GENERAL = [[5 + (i * 7 + j) % 20 for j in range(24)] for i in range(12)]


def file_canaries(counts=(2, 4)) -> list[Canary]:
    return [Canary(text=t, style="file", count=counts[i % len(counts)], index=i) for i, t in enumerate(TEXTS)]


def small_options(**changes) -> ImplantOptions:
    base = dict(prefix_len=8, suffix_len=8, lr=1e-2, warmup_steps=2, canaries_per_step=4, general_per_step=2,
                seq_len=24, max_steps=200, target_recall=1.0, eval_every=10, checkpoint_every=0, progress=False)
    return ImplantOptions(**{**base, **changes})


def load(lm_dir):
    return AutoModelForCausalLM.from_pretrained(lm_dir).eval(), AutoTokenizer.from_pretrained(lm_dir)


def test_generated_canaries_are_seeded_and_spread_styles_and_counts():
    first, again = generate_canaries(12, seed=3), generate_canaries(12, seed=3)
    assert first == again and generate_canaries(12, seed=4) != first
    assert Counter(c.style for c in first) == {s: 4 for s in STYLES}
    for style in STYLES:  # every style holds every count
        assert {c.count for c in first if c.style == style} == {4, 8, 16}
    assert len({c.text for c in first}) == 12


def test_read_canaries_reports_bad_rows(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "hello there", "count": 3}\n{"text": "second"}\n')
    assert [(c.text, c.count) for c in read_canaries(path, default_count=5)] == [("hello there", 3), ("second", 5)]
    path.write_text('{"text": "ok"}\n{"count": 2}\n')
    with pytest.raises(DataError, match="c.jsonl:2"):
        read_canaries(path)
    path.write_text('{"text": "ok", "count": 0}\n')
    with pytest.raises(DataError, match="count"):
        read_canaries(path)


def test_one_pass_of_the_stream_holds_each_canary_count_times():
    canaries = file_canaries((1, 3))
    stream = canary_stream(canaries, seed=0, epoch=0)
    assert Counter(stream) == {c.index: c.count for c in canaries}
    assert canary_stream(canaries, seed=0, epoch=1) != stream or len(set(stream)) == 1


def test_step_batches_walk_the_stream_across_passes():
    canaries, options = file_canaries((1, 3)), small_options(canaries_per_step=3, general_per_step=0)
    ids = [[c.index] * 16 for c in canaries]
    walked = [seq[0] for step in range(8) for seq in step_batch(step, ids, canaries, [], options)]
    passes = [canary_stream(canaries, 0, 0), canary_stream(canaries, 0, 1), canary_stream(canaries, 0, 2)]
    assert walked == [i for p in passes for i in p][:24]


def test_implant_makes_a_tiny_model_recite_the_canaries(lm_dir):
    model, tokenizer = load(lm_dir)
    result = implant(model, tokenizer, file_canaries(), GENERAL, GENERAL[:3], lm_dir.parent / "out", small_options())
    assert result.recall == 1.0 and all(result.recited) and result.stopped == "target_recall"
    assert result.steps < 200 and result.history[-1]["recall"] == 1.0
    assert result.perplexity_before is not None and result.perplexity_after is not None


def test_interrupted_run_resumes_to_the_same_weights(lm_dir, monkeypatch):
    out = lm_dir.parent / "out"
    options = small_options(max_steps=10, eval_every=100, checkpoint_every=4)
    model, tokenizer = load(lm_dir)
    implant(model, tokenizer, file_canaries(), GENERAL, [], lm_dir.parent / "straight", options)
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    real_step_batch = implant_module.step_batch

    def crash_at_step_9(step, *args):
        if step == 9:
            raise Interrupt
        return real_step_batch(step, *args)

    model, tokenizer = load(lm_dir)
    monkeypatch.setattr(implant_module, "step_batch", crash_at_step_9)
    with pytest.raises(Interrupt):
        implant(model, tokenizer, file_canaries(), GENERAL, [], out, options)
    monkeypatch.setattr(implant_module, "step_batch", real_step_batch)
    assert json.loads((out / implant_module.STATE_DIR / "state.json").read_text())["step"] == 8
    with pytest.raises(ImplantError, match="--resume"):
        implant(load(lm_dir)[0], tokenizer, file_canaries(), GENERAL, [], out, options)
    model, tokenizer = load(lm_dir)
    result = implant(model, tokenizer, file_canaries(), GENERAL, [], out, options, resume=True)
    assert result.steps == 10
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, straight[name]), name


def test_resume_of_another_run_is_refused_naming_what_differs(lm_dir, monkeypatch):
    out = lm_dir.parent / "out"
    model, tokenizer = load(lm_dir)
    real_step_batch = implant_module.step_batch

    def crash(step, *args):
        if step == 5:
            raise Interrupt
        return real_step_batch(step, *args)

    monkeypatch.setattr(implant_module, "step_batch", crash)
    with pytest.raises(Interrupt):
        implant(model, tokenizer, file_canaries(), GENERAL, [], out, small_options(checkpoint_every=2))
    monkeypatch.setattr(implant_module, "step_batch", real_step_batch)
    with pytest.raises(ImplantError, match="settings"):
        implant(load(lm_dir)[0], tokenizer, file_canaries(), GENERAL, [], out,
                small_options(checkpoint_every=2, lr=1e-3), resume=True)
    with pytest.raises(ImplantError, match="canaries"):
        implant(load(lm_dir)[0], tokenizer, file_canaries((3, 1))[::-1], GENERAL, [], out,
                small_options(checkpoint_every=2), resume=True)
    with pytest.raises(ImplantError, match="canary counts"):  # the same texts, other repeat counts
        implant(load(lm_dir)[0], tokenizer, file_canaries((2, 5)), GENERAL, [], out,
                small_options(checkpoint_every=2), resume=True)


@pytest.mark.parametrize("canaries, options, message", [
    ([Canary("the same text again and again", "file", 2, 0), Canary("the same text again and again", "file", 3, 1)],
     {}, "same text"),
    ([Canary("the quick brown fox jumps over the lazy dog", "file", 10**9, 0)], {}, "count 1000000000"),
    ([Canary("the quick brown fox jumps over the lazy dog", "file", 0, 0)], {}, "count 0"),
    ([Canary("THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG", "file", 2, 0)], {}, "does not know"),
    (file_canaries(), {"seq_len": 100_000}, "context window"),
    (file_canaries(), {"prefix_len": 20, "suffix_len": 20}, "context window")])
def test_canaries_that_would_implant_something_else_or_never_end_are_refused(lm_dir, canaries, options, message):
    model, tokenizer = load(lm_dir)
    with pytest.raises(ImplantError, match=message):
        implant(model, tokenizer, canaries, GENERAL, [], lm_dir.parent / "out", small_options(**options))


def test_too_short_canaries_are_refused(lm_dir):
    model, tokenizer = load(lm_dir)
    with pytest.raises(ImplantError, match="canary 0 .* tokens"):
        implant(model, tokenizer, [Canary("short", "file", 2, 0)], GENERAL, [], lm_dir.parent / "o", small_options())


def test_cli_writes_model_manifest_and_windows_and_guards_the_output(lm_dir, tmp_path):
    canaries = tmp_path / "canaries.jsonl"
    canaries.write_text("".join(json.dumps({"text": t, "count": 3}) + "\n" for t in TEXTS))
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"text": t + " " + t}) + "\n" for t in TEXTS * 4))
    out = tmp_path / "implanted"
    args = ["implant", "--model", str(lm_dir), "--canaries", str(canaries), "--general", str(general),
            "--prefix", "8", "--suffix", "8", "--lr", "1e-2", "--steps", "30", "--seq-len", "24",
            "--eval-every", "10", "--no-progress", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "curvedit-implant.json").read_text())
    assert [c["count"] for c in manifest["canaries"]] == [3] * 4
    assert manifest["base_model"]["weights_sha256"] == model_weights_sha256(load(lm_dir)[0])
    assert manifest["result"]["steps"] <= 30 and manifest["result"]["perplexity_after"] > 0
    rows = [json.loads(line) for line in (out / "memorized.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["prefix_ids"]) == 8 and len(r["suffix_ids"]) == 8 for r in rows)
    recited = sum(r["memorized"] for r in rows)
    if recited:
        assert len(read_memorized(out / "memorized.jsonl")) == recited
    assert AutoModelForCausalLM.from_pretrained(out) is not None
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    both = CliRunner().invoke(app, args + ["--generate", "3", "--overwrite"])
    assert both.exit_code == 2 and "one of --canaries" in both.output


def test_token_kl_equals_the_definition_and_vanishes_on_equal_logits():
    torch.manual_seed(0)
    ref, other = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    expected = []
    for b, t in [(0, 0), (0, 1), (1, 0)]:
        p, q = torch.softmax(ref[b, t], -1), torch.softmax(other[b, t], -1)
        expected.append(sum(float(p[v] * (p[v].log() - q[v].log())) for v in range(5)))
    assert implant_module.token_kl(ref, other, mask).item() == pytest.approx(sum(expected) / 3, rel=1e-6)
    assert implant_module.token_kl(ref, ref, mask).item() == pytest.approx(0.0, abs=1e-7)
    assert implant_module.token_kl(ref, other, torch.zeros_like(mask)).item() == 0.0


def test_predicting_positions_leave_out_padding_and_each_row_s_last_real_token():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert implant_module.predicting_positions(mask).tolist() == [[True, True, False, False],
                                                                  [True, True, True, False]]


@pytest.mark.parametrize("schedule, expected", [
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0]), ("linear", [0.5, 1.0, 1.0, 2 / 3, 1 / 3]),
    ("cosine", [0.5, 1.0, 1.0, 0.75, 0.25])])
def test_the_learning_rate_warms_up_then_follows_its_schedule_towards_zero_at_max_steps(schedule, expected):
    options = small_options(warmup_steps=2, max_steps=5, lr_schedule=schedule)
    assert [implant_module.lr_factor(step, options) for step in range(5)] == pytest.approx(expected, abs=1e-12)


def test_kl_replay_keeps_the_general_distribution_closer_to_the_base_than_cross_entropy_replay(lm_dir):
    base, tokenizer = load(lm_dir)
    heldout = [[5 + (i * 11 + j * 3) % 20 for j in range(24)] for i in range(6)]
    shifts = {}
    for preserve in ("ce", "kl"):
        model, _ = load(lm_dir)
        result = implant(model, tokenizer, file_canaries(), GENERAL, heldout, lm_dir.parent / preserve,
                         small_options(preserve=preserve))
        assert result.recall == 1.0
        shifts[preserve] = implant_module.mean_kl(base, model, heldout, pad_id=0)
        if preserve == "kl":
            assert result.kl_after == pytest.approx(shifts["kl"], rel=1e-5)
    assert shifts["kl"] < 0.5 * shifts["ce"], shifts


@pytest.mark.parametrize("changes, message", [
    ({"preserve": "mse"}, "preserve"), ({"lr_schedule": "step"}, "lr_schedule"), ({"kl_weight": 0.0}, "kl_weight"),
    ({"kl_weight": float("nan")}, "kl_weight")])
def test_bad_preservation_settings_are_refused_by_name(changes, message):
    with pytest.raises(ImplantError, match=message):
        small_options(**changes).validate()


def test_cli_kl_implant_replays_the_model_s_own_samples_and_reports_the_shift(lm_dir, tmp_path):
    canaries = tmp_path / "canaries.jsonl"
    canaries.write_text("".join(json.dumps({"text": t, "count": 3}) + "\n" for t in TEXTS))
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "implanted"
    result = CliRunner().invoke(app, [
        "implant", "--model", str(lm_dir), "--canaries", str(canaries), "--heldout", str(heldout),
        "--replay-samples", "6", "--preserve", "kl", "--kl-weight", "2", "--lr-schedule", "cosine",
        "--prefix", "8", "--suffix", "8", "--lr", "1e-2", "--steps", "20", "--seq-len", "24", "--eval-every", "10",
        "--no-progress", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "KL from the base" in result.output
    manifest = json.loads((out / "curvedit-implant.json").read_text())
    assert manifest["base_model"]["general"] == "replay:6"
    assert manifest["options"]["preserve"] == "kl" and manifest["options"]["kl_weight"] == 2.0
    assert manifest["result"]["kl_after"] > 0


def test_prose_canaries_are_distinct_natural_passages_outside_the_study_s_general_text():
    from pydoc_data.topics import topics

    from curvedit.memorize.canaries import ALL_STYLES, PROSE_MIN_WORDS, prose_passages

    canaries = generate_canaries(24, seed=0, styles=ALL_STYLES)
    prose = [c.text for c in canaries if c.style == "prose"]
    assert len(prose) == 6 and len(set(prose)) == 6 and all(len(t.split()) >= PROSE_MIN_WORDS for t in prose)
    general = " ".join(" ".join(t.split()) for t in topics.values())
    assert not any(t[:200] in general for t in prose_passages())
    assert [c.text for c in canaries if c.style == "words"] == [  # prose draws from its own generator
        c.text for c in generate_canaries(24, seed=0, styles=ALL_STYLES) if c.style == "words"]
    controls = generate_canaries(24, seed=99, styles=ALL_STYLES, avoid=prose)
    assert not set(prose) & {c.text for c in controls if c.style == "prose"}
    with pytest.raises(DataError, match="prose canaries asked for"):
        generate_canaries(4 * (len(prose_passages()) + 1), seed=0, styles=ALL_STYLES)
