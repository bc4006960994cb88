"""Durability attacks: round-to-nearest quantization and relearning by fine-tuning."""

from __future__ import annotations

import json
import random

import pytest
import torch
from typer.testing import CliRunner

from curvedit.cli import app
from curvedit.diagnostics.attack import (
    AttackError,
    RelearnOptions,
    block_weights,
    quantization_rows,
    quantize_rtn,
    quantized,
    recall_and_perplexity,
    relearn_curve,
)
from curvedit.evaluate.windows import Window
from tests.reciter import MEMORIZED, PREFIX, reciter_gpt2, trained_reciter, write_workspace


def test_quantize_rtn_by_hand():
    w = torch.tensor([[0.9, -0.3, 0.6, 0.0], [0.02, 0.012, -0.04, 4.0]])
    # 3 bits: levels -4..3, scale = max|w| / 3 per group
    q = quantize_rtn(w, bits=3, group_size=None)
    assert torch.allclose(q[0], torch.tensor([0.9, -0.3, 0.6, 0.0]))  # multiples of 0.3 are exact
    assert torch.allclose(q[1], torch.tensor([0.0, 0.0, 0.0, 4.0]))  # the outlier takes the whole row's scale
    grouped = quantize_rtn(w, bits=3, group_size=2)  # groups [0.02, 0.012] (scale 0.02/3) and [-0.04, 4.0]
    assert torch.allclose(grouped[1], torch.tensor([0.02, 2 * 0.02 / 3, 0.0, 4.0]))  # 0.012 / scale = 1.8 -> 2
    with pytest.raises(AttackError, match="bits"):
        quantize_rtn(w, bits=1)


def test_quantize_rtn_error_is_at_most_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(6, 37)
    for bits, group in ((8, 16), (4, 8), (4, None)):
        q = quantize_rtn(w, bits, group)
        size = 37 if group is None else group
        for row in range(6):
            for start in range(0, 37, size):
                block = w[row, start:start + size]
                step = float(block.abs().max()) / (2 ** (bits - 1) - 1)
                assert float((q[row, start:start + size] - block).abs().max()) <= step / 2 + 1e-6


def test_quantized_changes_block_weights_only_and_restores_them():
    model = reciter_gpt2(20, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = {t.name for t in block_weights(model)}
    assert names and all(".h." in n for n in names)  # not the embeddings, not the head
    with quantized(model, bits=4, group_size=8):
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
        assert changed and all(k.rsplit(".", 1)[0] in names for k in changed)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_relearn_matches_a_plain_adamw_loop_and_restores_the_model():
    model = reciter_gpt2(20, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = random.Random(5)
    data = [[rng.randrange(2, 20) for _ in range(12)] for _ in range(6)]
    probe = torch.tensor([data[0]])

    def loss_on_probe(m):
        with torch.no_grad():
            return {"probe_loss": float(m(input_ids=probe, labels=probe).loss)}

    rows = relearn_curve(model, data, loss_on_probe, RelearnOptions(steps=(0, 3), lr=1e-2, batch_size=2, seed=7,
                                                                    max_grad_norm=None, progress=False))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # the same three steps by hand: the same seeded order, AdamW, mean token loss
    order = list(range(6))
    random.Random(7).shuffle(order)
    reference = reciter_gpt2(20, seed=2)
    reference.train()
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(3):
        ids = torch.tensor([data[i] for i in order[2 * step: 2 * step + 2]])
        loss = reference(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    reference.eval()
    assert rows[0]["step"] == 0 and rows[0]["loss"] is None
    assert rows[0]["probe_loss"] == pytest.approx(loss_on_probe(reciter_gpt2(20, seed=2))["probe_loss"])
    assert rows[1]["probe_loss"] == pytest.approx(loss_on_probe(reference)["probe_loss"], rel=1e-4)


def test_relearning_brings_back_what_was_removed():
    reciter = trained_reciter()
    windows = [Window(ids[:PREFIX], ids[PREFIX:]) for ids in
               (reciter.tokenizer(t, add_special_tokens=False)["input_ids"] for t in MEMORIZED)]
    fresh = reciter_gpt2(len(reciter.tokenizer), seed=3)  # never saw the windows
    rows = relearn_curve(fresh, [w.prefix_ids + w.suffix_ids for w in windows],
                         lambda m: recall_and_perplexity(m, windows, None),
                         RelearnOptions(steps=(0, 150), lr=1e-2, batch_size=4, progress=False))
    assert rows[0]["strict"] == 0.0 and rows[1]["strict"] == 1.0
    with pytest.raises(AttackError, match="ascending"):
        relearn_curve(fresh, [[1, 2]], lambda m: {}, RelearnOptions(steps=(10, 5)))


def test_quantization_rows_measure_as_is_then_each_width():
    model = reciter_gpt2(20, seed=4)
    rows = quantization_rows(model, lambda m: {"w": float(block_weights(m)[0].weight_oi()[0, 0])}, (8, 2), 4)
    assert [r["bits"] for r in rows] == [None, 8, 2]
    assert rows[0]["w"] != rows[2]["w"]


def test_cli_attacks(tmp_path):
    root = write_workspace(tmp_path / "ws")
    runner = CliRunner()
    mem = tmp_path / "mem.jsonl"
    assert runner.invoke(app, ["find-memorized", "--model", str(root / "model"), "--data", str(root / "corpus.jsonl"),
                               "--prefix", str(PREFIX), "--suffix", "12", "--out", str(mem)]).exit_code == 0
    out = tmp_path / "q.json"
    done = runner.invoke(app, ["attack", "quantize", "--model", str(root / "model"), "--memorized", str(mem),
                               "--heldout", str(root / "heldout.jsonl"), "--bits", "8,2", "--group-size", "16",
                               "--out", str(out), "--no-progress"])
    assert done.exit_code == 0, done.output
    rows = json.loads(out.read_text())["rows"]
    assert [r["bits"] for r in rows] == [None, 8, 2] and rows[0]["strict"] == 1.0 and "perplexity_ci" in rows[0]
    out = tmp_path / "r.json"
    done = runner.invoke(app, ["attack", "relearn", "--model", str(root / "model"), "--memorized", str(mem),
                               "--data", str(root / "heldout.jsonl"), "--steps", "0,2", "--seq-len", "16",
                               "--out", str(out), "--no-progress"])
    assert done.exit_code == 0, done.output
    assert [r["step"] for r in json.loads(out.read_text())["rows"]] == [0, 2]
