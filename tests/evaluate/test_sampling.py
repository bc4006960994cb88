"""`curvedit sample`: ancestral sampling from the model itself, seeded per sequence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from curvedit.cli import app
from curvedit.evaluate.sampling import SampleError, SampleOptions, sample_sequences, sequence_uniforms
from tests.tiny_models import tiny_gpt2


class Tok:
    """The least a sampler needs of a tokenizer."""

    def __init__(self, bos=0, eos=None):
        self.bos_token_id, self.eos_token_id = bos, eos


def reference_sample(model, start, index, options):
    """One sequence without a KV cache: the whole prefix forward at every step, and the
    inverse-CDF pick done in numpy float64."""
    uniforms = sequence_uniforms(options.seed, index, options.seq_len - 1).numpy()
    seq = [start]
    for t in range(options.seq_len - 1):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1].double().numpy()
        probs = np.exp((logits - logits.max()) / options.temperature)
        cdf = np.cumsum(probs / probs.sum())
        seq.append(int(min(np.searchsorted(cdf / cdf[-1], uniforms[t], side="right"), len(cdf) - 1)))
    return seq


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_cached_batched_sampling_equals_sampling_each_sequence_alone_without_a_cache(temperature):
    model = tiny_gpt2(vocab=11)
    options = SampleOptions(n=5, seq_len=9, temperature=temperature, seed=3, batch_size=2, progress=False)
    got = sample_sequences(model, Tok(bos=4), options)
    assert got == [reference_sample(model, 4, i, options) for i in range(5)]


def test_a_sequence_does_not_depend_on_the_batch_size_or_on_n():
    model = tiny_gpt2(vocab=11)
    one = sample_sequences(model, Tok(), SampleOptions(n=6, seq_len=8, batch_size=1, progress=False))
    assert sample_sequences(model, Tok(), SampleOptions(n=6, seq_len=8, batch_size=4, progress=False)) == one
    assert sample_sequences(model, Tok(), SampleOptions(n=3, seq_len=8, batch_size=3, progress=False)) == one[:3]
    assert sample_sequences(model, Tok(), SampleOptions(n=6, seq_len=8, seed=1, progress=False)) != one


def test_first_tokens_follow_the_model_s_tempered_distribution():
    model = tiny_gpt2(vocab=11, seed=2)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[0]])).logits[0, -1].double()
    for temperature in (1.0, 0.5):
        probs = torch.softmax(logits / temperature, -1).numpy()
        seqs = sample_sequences(model, Tok(), SampleOptions(n=4000, seq_len=2, temperature=temperature,
                                                            batch_size=1000, progress=False))
        counts = np.bincount([s[1] for s in seqs], minlength=11)
        expected = 4000 * probs
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 35, (chi2, counts, expected)  # 10 degrees of freedom: p ~ 1e-4


def test_a_sequence_ends_at_eos_and_keeps_it():
    model = tiny_gpt2(vocab=11)
    seqs = sample_sequences(model, Tok(bos=0, eos=3), SampleOptions(n=40, seq_len=12, progress=False))
    ended = [s for s in seqs if 3 in s[1:]]
    assert ended, "some sequence should draw EOS in 40 x 11 draws over 11 tokens"
    for s in ended:
        assert s.index(3, 1) == len(s) - 1
    assert all(len(s) == 12 for s in seqs if 3 not in s[1:])


@pytest.mark.parametrize("changes, message", [
    ({"n": 0}, "number of sequences"), ({"seq_len": 1}, "seq_len"), ({"temperature": 0.0}, "temperature"),
    ({"temperature": float("inf")}, "temperature"), ({"batch_size": 0}, "batch size"),
    ({"seq_len": 40}, "context window"), ({"start_id": 11, "seq_len": 4}, "outside the vocabulary")])
def test_bad_sampling_requests_are_refused_by_name(changes, message):
    with pytest.raises(SampleError, match=message):
        sample_sequences(tiny_gpt2(vocab=11), Tok(), SampleOptions(**{"progress": False, "seq_len": 8, **changes}))


def test_no_start_token_is_refused():
    with pytest.raises(SampleError, match="start token"):
        sample_sequences(tiny_gpt2(vocab=11), Tok(bos=None), SampleOptions(progress=False, seq_len=4))


def test_the_cli_writes_jsonl_that_collect_reads(lm_dir, tmp_path):
    out = tmp_path / "samples.jsonl"
    result = CliRunner().invoke(app, ["sample", "--model", str(lm_dir), "--out", str(out), "--n", "6",
                                      "--seq-len", "10", "--seed", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and all(2 <= len(r["input_ids"]) <= 10 and isinstance(r["text"], str) for r in rows)
    again = CliRunner().invoke(app, ["sample", "--model", str(lm_dir), "--out", str(out), "--n", "6"])
    assert again.exit_code == 2 and "exists" in again.output
    factors = tmp_path / "factors"
    collected = CliRunner().invoke(app, ["collect", "--model", str(lm_dir), "--data", str(out), "--out",
                                         str(factors), "--no-progress"])
    assert collected.exit_code == 0, collected.output
