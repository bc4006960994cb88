"""The positional stress test on the trained tiny model."""

from __future__ import annotations

import pytest

from curvedit.windows import Window
from curvedit.evaluate.stress import StressOptions, score_continuations, stress_test
from evaluate_helpers import HELDOUT, MEMORIZED, PREFIX, SUFFIX, trained_reciter


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
