"""The positional stress test on the trained tiny model."""

from __future__ import annotations

import pytest
import torch

from curvedit.evaluate.generation import greedy_generate
from curvedit.evaluate.memorization import longest_prefix_match
from curvedit.evaluate.stress import (
    ReferenceStressOptions,
    StressOptions,
    match_runs,
    reference_stress_test,
    reference_variants,
    score_continuations,
    stress_test,
)
from curvedit.evaluate.windows import Window
from tests.reciter import HELDOUT, MEMORIZED, PREFIX, SUFFIX, trained_reciter


@pytest.fixture(scope="module")
def reciter():
    return trained_reciter()


@pytest.fixture(scope="module")
def windows(reciter):
    ids = [reciter.tokenizer(t, add_special_tokens=False)["input_ids"] for t in MEMORIZED]
    return [Window(i[:PREFIX], i[PREFIX:]) for i in ids]


@pytest.fixture(scope="module")
def filler(reciter):
    return reciter.tokenizer("".join(HELDOUT), add_special_tokens=False)["input_ids"]


def test_reports_original_then_each_perturbation(reciter, windows, filler):
    results = stress_test(reciter.model, windows, StressOptions(left_extend=(4,), right_shift=(3, 12), batch_size=2),
                          filler_ids=filler)
    assert [r.key for r in results] == ["original", "left_extend_4", "right_shift_3", "right_shift_12"]
    original = results[0]
    assert (original.n, original.exact, original.mean_prefix_match, original.mean_prefix_fraction) == (4, 1.0, 12, 1.0)
    for result in results[1:3]:
        assert result.n == 4 and 0.0 <= result.mean_prefix_fraction <= 1.0
        assert 0.0 <= result.mean_prefix_match <= SUFFIX
    shifted_all = results[3]  # a shift of the whole suffix leaves nothing to predict
    assert (shifted_all.n, shifted_all.skipped, shifted_all.exact) == (0, 4, None)


def test_scores_are_longest_exact_prefixes(reciter, windows):
    prompt, target = windows[0].prefix_ids, windows[0].suffix_ids
    wrong = list(target)
    wrong[5] = next(t for t in reciter.tokenizer.convert_tokens_to_ids(list("ab")) if t != target[5])
    assert score_continuations(reciter.model, [(prompt, target), (prompt, wrong)]) == [SUFFIX, 5]


def test_left_extension_needs_filler_and_room_in_the_context(reciter, windows, filler):
    with pytest.raises(ValueError, match="filler"):
        stress_test(reciter.model, windows, StressOptions(left_extend=(4,), right_shift=()))
    with pytest.raises(ValueError, match="left-extended by 40 tokens.*context window of 64"):
        stress_test(reciter.model, windows, StressOptions(left_extend=(40,), right_shift=()), filler_ids=filler)
    with pytest.raises(ValueError, match="at least 1"):
        stress_test(reciter.model, windows, StressOptions(left_extend=(), right_shift=(0,)))


# ---- the reference test (the paper's position perturbations) ----

def test_reference_variants_are_the_union_of_extensions_and_truncations():
    # n = 5, k = 3, t = 2: extensions by 1..2 suffix tokens, truncations to 3..4 prefix tokens
    assert reference_variants(5, 3, 2, include_original=False) == [(0, 1), (0, 2), (2, 0), (1, 0)]
    assert reference_variants(5, 3, 2, include_original=True)[0] == (0, 0)
    # the authors' count: min(t, k) + 1 extensions + (n - t) truncations - 1 shared full prefix - 1 excluded
    n, k, t = 64, 48, 20
    assert len(reference_variants(n, k, t, include_original=False)) == min(t, k) + 1 + (n - t) - 2
    assert reference_variants(4, 2, 10, include_original=False) == [(0, 1), (0, 2)]  # n <= t: no truncation


def test_match_runs_count_consecutive_matches_from_each_position():
    match = torch.tensor([[True, True, False, True], [False, False, False, False], [True, True, True, True]])
    assert match_runs(match).tolist() == [[2, 1, 0, 1, 0], [0, 0, 0, 0, 0], [4, 3, 2, 1, 0]]


def _brute_force_stress(model, windows, t, include_original):
    """Greedy-decode every perturbed prompt separately and take the max (the authors' procedure)."""
    best, original = [], []
    for w in windows:
        scores = []
        for start, extension in reference_variants(len(w.prefix_ids), len(w.suffix_ids), t, include_original):
            prompt = w.prefix_ids[start:] + w.suffix_ids[:extension]
            out = greedy_generate(model, [prompt], len(w.suffix_ids), batch_size=1)[0]
            scores.append(longest_prefix_match(out, w.suffix_ids[extension:]))
        best.append(max(scores))
        original.append(longest_prefix_match(greedy_generate(model, [w.prefix_ids], len(w.suffix_ids))[0],
                                             w.suffix_ids))
    return best, original


@pytest.mark.parametrize("include_original", [False, True])
def test_reference_stress_equals_greedy_decoding_of_every_variant(reciter, windows, include_original):
    # windows cut at other points than the trained split, and a wrong token planted, give partial scores
    varied = [Window(w.prefix_ids[:10], w.prefix_ids[10:] + w.suffix_ids[:6]) for w in windows]
    broken = list(windows[0].suffix_ids)
    broken[7] = (broken[7] + 1) % 26 + 2
    varied.append(Window(windows[0].prefix_ids, broken))
    result = reference_stress_test(reciter.model, varied, ReferenceStressOptions(t=3, include_original=include_original,
                                                                                 batch_size=4))
    best, original = _brute_force_stress(reciter.model, varied, 3, include_original)
    assert result.stress == best and result.original == original
    assert len(set(best)) > 1  # the case is not trivial
    summary = result.summary()
    assert summary["full_match"] == sum(b == len(w.suffix_ids) for b, w in zip(best, varied)) / len(varied)
    assert summary["mean_stress_ci"]["low"] <= summary["mean_stress"] <= summary["mean_stress_ci"]["high"]


def test_reference_stress_of_recited_windows(reciter, windows):
    # t = 20 > n = 16: no truncation, and every extension leaves fewer than |S| tokens to recite
    result = reference_stress_test(reciter.model, windows)
    assert result.stress == [SUFFIX - 1] * 4 and result.original == [SUFFIX] * 4
    assert result.summary()["full_match"] == 0.0 and result.summary()["improved"] == 0.0
    counted = reference_stress_test(reciter.model, windows, ReferenceStressOptions(include_original=True))
    assert counted.stress == [SUFFIX] * 4 and counted.summary()["full_match"] == 1.0
    with pytest.raises(ValueError, match="at least 1"):
        reference_stress_test(reciter.model, windows, ReferenceStressOptions(t=0))
