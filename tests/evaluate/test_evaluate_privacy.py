"""Membership inference, exact memorization, extraction strength and sampled extraction.

References: float64 loops over positions and over the vocabulary, scikit-learn's AUROC,
hand-computed cases, and a model that memorized its windows against one that never saw them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from curvedit.evaluate.privacy import (
    auroc,
    auroc_interval,
    extraction_metrics,
    extraction_strength,
    membership_inference,
    membership_scores,
    sequence_stats,
    suffix_nll,
    zlib_entropy,
)
from tests.reciter import HELDOUT, MEMORIZED, PREFIX, SUFFIX, reciter_gpt2, trained_reciter


@pytest.fixture(scope="module")
def reciter():
    return trained_reciter()


def _ids(reciter, texts):
    return [reciter.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_sequence_stats_match_a_float64_loop_over_positions_and_vocabulary():
    model = reciter_gpt2(23, seed=3).double()
    sequences = [[5, 9, 2, 7, 7, 3], [4, 8, 1], [6, 6, 6, 6, 6]]
    stats = sequence_stats(model, sequences, batch_size=2, temperature=0.7)
    for seq, got in zip(sequences, stats):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq])).logits[0].double()
        for t in range(1, len(seq)):
            logp = torch.log_softmax(logits[t - 1], dim=-1)
            p = logp.exp()
            mean = sum(float(p[v] * logp[v]) for v in range(23))
            var = sum(float(p[v] * (logp[v] - mean) ** 2) for v in range(23))
            assert got.logprob[t - 1] == pytest.approx(float(logp[seq[t]]), abs=1e-5)
            assert got.mean_logprob[t - 1] == pytest.approx(mean, abs=1e-5)
            assert got.std_logprob[t - 1] == pytest.approx(math.sqrt(var), abs=1e-5)
            assert got.argmax_match[t - 1] == (int(logits[t - 1].argmax()) == seq[t])
            tempered = torch.log_softmax(logits[t - 1] / 0.7, dim=-1)
            assert got.tempered_logprob[t - 1] == pytest.approx(float(tempered[seq[t]]), abs=1e-5)
        assert got.loss == pytest.approx(-float(np.mean(got.logprob)))


def test_suffix_nll_is_the_mean_loss_over_every_window_s_suffix_tokens_alone():
    from curvedit.errors import EvaluateError
    from curvedit.evaluate.windows import Window

    model = reciter_gpt2(23, seed=3).double()
    windows = [Window([5, 9, 2], [7, 7, 3]), Window([4], [8, 1, 6, 2]), Window([6, 6, 6, 6], [6])]
    losses = []
    for w in windows:  # one window at a time, unpadded, in float64
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([w.prefix_ids + w.suffix_ids])).logits[0], dim=-1)
        losses += [-float(logp[len(w.prefix_ids) + i - 1, t]) for i, t in enumerate(w.suffix_ids)]
    expected = sum(losses) / len(losses)
    assert suffix_nll(model, windows, batch_size=2) == pytest.approx(expected, abs=1e-6)  # its logits are float32
    with pytest.raises(EvaluateError, match="at least one window"):
        suffix_nll(model, [])


def test_auroc_matches_scikit_learn_with_ties():
    rng = np.random.default_rng(0)
    members, nonmembers = rng.integers(0, 5, 40).astype(float), rng.integers(1, 6, 30).astype(float)
    expected = roc_auc_score([1] * 40 + [0] * 30, np.concatenate([members, nonmembers]))
    assert auroc(members, nonmembers) == pytest.approx(expected)
    interval = auroc_interval(members, nonmembers)
    assert interval.low <= interval.value <= interval.high and interval.n == 40
    assert auroc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert auroc(np.array([1.0]), np.array([1.0])) == 0.5
    with pytest.raises(ValueError, match="at least one member"):
        auroc(np.array([]), np.array([1.0]))


def test_extraction_strength_by_hand():
    assert extraction_strength(np.array([True, True, True, True])) == 1.0  # the prefix alone recites it
    assert extraction_strength(np.array([False, True, True, True])) == 0.75  # one suffix token given first
    assert extraction_strength(np.array([True, False, True, True])) == 0.5
    assert extraction_strength(np.array([True, True, True, False])) == 0.0  # not even the last token


def test_membership_scores_by_hand():
    from curvedit.evaluate.privacy import SequenceStats

    logprob = np.log(np.array([0.5, 0.25, 0.125, 1.0, 0.5]))
    stats = SequenceStats(logprob=logprob, mean_logprob=np.full(5, -1.0), std_logprob=np.full(5, 2.0),
                          argmax_match=np.ones(5, dtype=bool))
    loss = -logprob.mean()
    scores = membership_scores([stats], ["abcabcabc"], k_percent=40, reference_losses=[0.25])
    assert scores["loss"][0] == pytest.approx(-loss)
    assert scores["zlib"][0] == pytest.approx(-loss / zlib_entropy("abcabcabc"))
    assert scores["min_k"][0] == pytest.approx(np.log([0.125, 0.25]).mean())  # lowest 40% of 5 = 2 positions
    assert scores["min_k_plus_plus"][0] == pytest.approx(((np.log([0.125, 0.25]) + 1.0) / 2.0).mean())
    assert scores["reference"][0] == pytest.approx(-(loss - 0.25))


def test_sampled_extraction_is_the_product_of_tempered_probabilities(reciter):
    windows = _ids(reciter, MEMORIZED)
    stats = sequence_stats(reciter.model, windows, temperature=1.5)
    metrics = extraction_metrics(stats, [SUFFIX] * len(windows), samples=7)
    expected_p = []
    for ids in windows:  # one forward per suffix token, from scratch, float64
        logp = 0.0
        for t in range(PREFIX, len(ids)):
            with torch.no_grad():
                logits = reciter.model(input_ids=torch.tensor([ids[:t]])).logits[0, -1].double()
            logp += float(torch.log_softmax(logits / 1.5, dim=-1)[ids[t]])
        expected_p.append(math.exp(logp))
    assert metrics["sample_probability"] == pytest.approx(np.mean(expected_p), rel=1e-4)
    assert metrics["sampled_extraction"] == pytest.approx(np.mean([1 - (1 - p) ** 7 for p in expected_p]), rel=1e-4)
    assert metrics["samples"] == 7 and metrics["n"] == 4
    with pytest.raises(ValueError, match="tempered"):
        extraction_metrics(sequence_stats(reciter.model, windows), [SUFFIX] * 4, samples=3)


def test_a_memorizing_model_against_one_that_never_saw_the_windows(reciter):
    members, nonmembers = _ids(reciter, MEMORIZED), _ids(reciter, HELDOUT)
    never = reciter_gpt2(len(reciter.tokenizer), seed=5)
    for model, memorized in ((reciter.model, True), (never, False)):
        m_stats, n_stats = sequence_stats(model, members), sequence_stats(model, nonmembers)
        extraction = extraction_metrics(m_stats, [SUFFIX] * 4)
        mia = membership_inference(m_stats, n_stats, MEMORIZED, HELDOUT)
        if memorized:
            assert extraction["exact_memorization"] == 1.0 and extraction["extraction_strength"] == 1.0
            assert all(mia[name]["auroc"] == 1.0 for name in ("loss", "zlib", "min_k", "min_k_plus_plus"))
        else:
            assert extraction["exact_memorization"] < 0.3 and extraction["extraction_strength"] < 0.3
            assert mia["loss"]["auroc"] < 1.0
        assert "reference" not in mia


def test_stratified_auroc_compares_pairs_within_a_stratum_only():
    from curvedit.evaluate.privacy import stratified_auroc_interval

    # each stratum separates perfectly, though stratum 2's non-members score above stratum 1's members
    strata = [(np.array([1.0, 2.0]), np.array([0.0, 0.5, 0.7])), (np.array([10.0]), np.array([5.0, 6.0]))]
    interval = stratified_auroc_interval(strata)
    assert (interval.value, interval.low, interval.high, interval.n) == (1.0, 1.0, 1.0, 3)
    mixed = [(np.array([1.0, 0.0]), np.array([0.5])), (np.array([3.0]), np.array([4.0, 2.0]))]
    assert stratified_auroc_interval(mixed).value == pytest.approx((2 * 0.5 + 2 * 0.5) / 4)
