"""Perplexity and nDCG@k, the guards of general ability."""

from __future__ import annotations

import math

import pytest
import torch

from curvedit.data import DataError
from curvedit.evaluate.perplexity import ndcg_at_k, next_token_rankings, perplexity
from tests.reciter import reciter_gpt2

VOCAB = 40


@pytest.fixture(scope="module")
def model():
    return reciter_gpt2(VOCAB, n_positions=32, seed=1)


@pytest.fixture(scope="module")
def sequences():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (9, 3, 17, 1, 12)]


def float64_perplexity(model, sequences):
    """By hand: each sequence alone, log-softmax in float64, every position but the first."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for seq in sequences:
            logits = model(input_ids=torch.tensor([seq])).logits[0].double()
            logp = logits.log_softmax(-1)[:-1].gather(1, torch.tensor(seq[1:])[:, None])
            nll -= float(logp.sum())
            count += len(seq) - 1
    return math.exp(nll / count), count


def test_perplexity_is_token_weighted_and_matches_a_float64_recomputation(model, sequences):
    expected, count = float64_perplexity(model, sequences)
    result = perplexity(model, sequences, batch_size=2)
    assert result.tokens == count == 8 + 2 + 16 + 0 + 11
    assert result.sequences == 5
    assert result.perplexity == pytest.approx(expected, rel=1e-5)


def test_padding_does_not_change_perplexity(model, sequences):
    alone = perplexity(model, sequences, batch_size=1)  # no padding at all
    padded = perplexity(model, sequences, batch_size=len(sequences), pad_id=7)
    assert padded.tokens == alone.tokens
    assert padded.perplexity == pytest.approx(alone.perplexity, rel=1e-5)


def test_perplexity_needs_a_token_to_predict(model):
    with pytest.raises(DataError, match="at least one sequence of 2 or more tokens"):
        perplexity(model, [[5]])


def test_perplexity_refuses_sequences_beyond_the_context(model):
    with pytest.raises(ValueError, match="context window of 32"):
        perplexity(model, [[1] * 33])


def test_ndcg_of_the_reference_against_itself_is_one(model, sequences):
    reference = next_token_rankings(model, sequences, k=10, batch_size=2)
    assert reference.probs.shape == (9 + 3 + 17 + 1 + 12, 10)  # every real position, padding excluded
    result = ndcg_at_k(model, sequences, reference, batch_size=3)
    assert result.ndcg == pytest.approx(1.0) and result.positions == 42 and result.k == 10


def test_ndcg_of_another_model_is_lower(model, sequences):
    reference = next_token_rankings(model, sequences, k=10)
    other = reciter_gpt2(VOCAB, n_positions=32, seed=2)
    assert 0.0 <= ndcg_at_k(other, sequences, reference).ndcg < 0.9


def test_ndcg_needs_the_reference_sequences(model, sequences):
    reference = next_token_rankings(model, sequences, k=5)
    with pytest.raises(ValueError, match="do not match"):
        ndcg_at_k(model, sequences[:2], reference)
