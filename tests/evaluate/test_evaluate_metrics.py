"""Recitation, nDCG and report metrics on hand-computed cases (no model involved)."""

from __future__ import annotations

import math

import pytest
import torch

from curvedit.evaluate.memorization import NearDuplicateFilter, longest_prefix_match, recitation_metrics
from curvedit.evaluate.perplexity import NextTokenRankings, ndcg_from_rankings
from curvedit.evaluate.report import retention
from curvedit.evaluate.results import flatten_metrics
from curvedit.evaluate.stress import left_extended, right_shifted
from curvedit.evaluate.windows import Window


def score(generated, target, **kwargs):
    return recitation_metrics([generated], [target], **kwargs).examples[0]


def test_exact_recitation_is_strict_and_loose_with_zero_distance():
    s = score([1, 2, 3, 4], [1, 2, 3, 4])
    assert (s.distance, s.normalized_distance, s.strict, s.loose, s.prefix_match) == (0, 0.0, True, True, 4)


def test_one_substitution_costs_one_edit():
    s = score([1, 9, 3, 4], [1, 2, 3, 4])
    assert s.distance == 1 and s.normalized_distance == 0.25
    assert not s.strict and s.loose  # 1 - 1/4 = 0.75 >= 0.75: the boundary counts as loose
    assert s.prefix_match == 1


def test_one_deletion_costs_one_edit():
    s = score([1, 3, 4], [1, 2, 3, 4])
    assert s.distance == 1 and s.loose and not s.strict


def test_loose_threshold_is_inclusive_and_configurable():
    assert not score([1, 9, 3, 4], [1, 2, 3, 4], loose_threshold=0.8).loose
    assert not score([1, 9, 9, 4], [1, 2, 3, 4]).loose  # 1 - 2/4 = 0.5


def test_empty_generation_is_at_distance_L():
    s = score([], [5, 6, 7])
    assert (s.distance, s.normalized_distance, s.strict, s.loose, s.prefix_match) == (3, 1.0, False, False, 0)


def test_suffix_of_length_one():
    assert score([7], [7]).strict
    wrong = score([8], [7])
    assert (wrong.distance, wrong.normalized_distance, wrong.loose) == (1, 1.0, False)


def test_aggregates_are_means_over_examples():
    result = recitation_metrics([[1, 2], [1, 9], [9, 9, 9, 9]], [[1, 2], [1, 2], [1, 2, 3, 4]])
    assert result.n == 3
    assert result.strict == pytest.approx(1 / 3)
    assert result.loose == pytest.approx(1 / 3)  # 1 - 1/2 = 0.5 and 1 - 4/4 = 0 are not loose
    assert result.avg_normalized_distance == pytest.approx((0 + 0.5 + 1.0) / 3)


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="empty"):
        recitation_metrics([[1]], [[]])
    with pytest.raises(ValueError, match="2 generations for 1 targets"):
        recitation_metrics([[1], [2]], [[1]])
    with pytest.raises(ValueError, match="at least one"):
        recitation_metrics([], [])


def test_longest_prefix_match():
    assert longest_prefix_match([1, 2, 3], [1, 2, 4]) == 2
    assert longest_prefix_match([1, 2], [1, 2, 3]) == 2
    assert longest_prefix_match([], [1]) == 0


def test_probability_graded_ndcg_by_hand():
    reference = NextTokenRankings(probs=torch.tensor([[0.5, 0.3, 0.2]]), indices=torch.tensor([[4, 7, 1]]))
    assert ndcg_from_rankings(torch.tensor([[4, 7, 1]]), reference).item() == pytest.approx(1.0)
    # model ranks 7 first, an unranked token (gain 0) second, 4 third
    dcg = 0.3 / math.log2(2) + 0.0 + 0.5 / math.log2(4)
    idcg = 0.5 / math.log2(2) + 0.3 / math.log2(3) + 0.2 / math.log2(4)
    assert ndcg_from_rankings(torch.tensor([[7, 9, 4]]), reference, "probability").item() == pytest.approx(dcg / idcg)
    assert ndcg_from_rankings(torch.tensor([[8, 9, 10]]), reference, "probability").item() == 0.0


def test_rank_graded_ndcg_by_hand():
    # the paper's code: the reference's r-th token has relevance k + 1 - r (here 3, 2, 1)
    reference = NextTokenRankings(probs=torch.tensor([[0.5, 0.3, 0.2]]), indices=torch.tensor([[4, 7, 1]]))
    assert ndcg_from_rankings(torch.tensor([[4, 7, 1]]), reference).item() == pytest.approx(1.0)
    dcg = 2 / math.log2(2) + 0.0 + 3 / math.log2(4)  # 7 (relevance 2) first, unranked 9, then 4 (relevance 3)
    idcg = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_from_rankings(torch.tensor([[7, 9, 4]]), reference).item() == pytest.approx(dcg / idcg)
    assert ndcg_from_rankings(torch.tensor([[8, 9, 10]]), reference).item() == 0.0
    with pytest.raises(ValueError, match="unknown nDCG gain"):
        ndcg_from_rankings(torch.tensor([[4, 7, 1]]), reference, "logit")


@pytest.mark.parametrize("gain", ["rank", "probability"])
def test_ndcg_matches_a_loop_over_positions(gain):
    generator = torch.Generator().manual_seed(0)
    k, vocab, rows = 10, 14, 50  # a small vocabulary so that the rankings share tokens
    reference_ids = torch.stack([torch.randperm(vocab, generator=generator)[:k] for _ in range(rows)])
    model_ids = torch.stack([torch.randperm(vocab, generator=generator)[:k] for _ in range(rows)])
    probs = torch.rand(rows, k, generator=generator).sort(dim=1, descending=True).values
    got = ndcg_from_rankings(model_ids, NextTokenRankings(probs=probs, indices=reference_ids), gain)
    for row in range(rows):
        relevance = {int(t): (k - r if gain == "rank" else float(probs[row, r]))
                     for r, t in enumerate(reference_ids[row])}
        dcg = sum(relevance.get(int(t), 0.0) / math.log2(r + 2) for r, t in enumerate(model_ids[row]))
        idcg = sum(relevance[int(t)] / math.log2(r + 2) for r, t in enumerate(reference_ids[row]))
        assert got[row].item() == pytest.approx(dcg / idcg, rel=1e-12)


def test_ndcg_rejects_rankings_of_other_positions():
    reference = NextTokenRankings(probs=torch.ones(2, 3) / 3, indices=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="do not match"):
        ndcg_from_rankings(torch.zeros(3, 3, dtype=torch.long), reference)


def test_near_duplicate_filter_uses_ngram_jaccard():
    dedup = NearDuplicateFilter(threshold=0.5, n=2)
    assert dedup.admit([1, 2, 3, 4, 5])  # bigrams 12 23 34 45
    assert not dedup.admit([1, 2, 3, 4, 6])  # shares 3 of 5 distinct bigrams: 0.6 >= 0.5
    assert dedup.admit([1, 2, 7, 8, 9])  # shares 1 of 7: admitted
    assert not dedup.admit([1, 2, 3, 4, 5])  # exact duplicate


def test_stress_perturbations_follow_their_definitions():
    window = Window(prefix_ids=[1, 2, 3, 4], suffix_ids=[5, 6, 7])
    assert right_shifted([window], 2) == [([3, 4, 5, 6], [7])]
    assert right_shifted([window], 3) == [None]  # nothing left to predict
    filler = [90, 91, 92, 93, 94]
    assert left_extended([window, window], 2, filler) == [([90, 91, 1, 2, 3, 4], [5, 6, 7]),
                                                          ([92, 93, 1, 2, 3, 4], [5, 6, 7])]
    assert left_extended([window], 7, [8, 9])[0][0][:7] == [8, 9, 8, 9, 8, 9, 8]  # filler wraps around


def test_flatten_keeps_scores_and_drops_counts():
    metrics = {"recitation": {"dolma": {"n": 5, "strict": 1.0, "loose": 1.0, "loose_threshold": 0.75}},
               "perplexity": {"perplexity": 12.5, "tokens": 900}, "ndcg": {"ndcg@10": 0.9, "positions": 10},
               "stress": {"dolma": {"right_shift_8": {"exact": None, "mean_prefix_match": 3.0}}}}
    assert flatten_metrics(metrics) == {"recitation/dolma/strict": 1.0, "recitation/dolma/loose": 1.0,
                                        "perplexity": 12.5, "ndcg@10": 0.9,
                                        "stress/dolma/right_shift_8/mean_prefix_match": 3.0}


def test_retention_is_a_percentage_of_the_reference():
    assert retention(0.5, 2.0) == 25.0
    assert retention(1.0, 0.0) is None and retention(None, 1.0) is None
