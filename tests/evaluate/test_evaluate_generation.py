"""Batched greedy decoding equals decoding each prompt alone, without cache or padding."""

from __future__ import annotations

import pytest
import torch

from curvedit.evaluate.generation import greedy_generate
from curvedit.models import context_window
from tests.reciter import reciter_gpt2


def one_by_one(model, prompt, steps):
    """Reference decoder: full forward pass over the growing sequence, no cache, no padding."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def model():
    return reciter_gpt2(48, n_positions=48, seed=3)


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, 48, (n,), generator=gen).tolist() for n in (1, 5, 9, 13, 4, 20, 7)]


def test_batched_left_padded_decoding_matches_one_by_one(model, prompts):
    expected = [one_by_one(model, p, 12) for p in prompts]
    for batch_size in (1, 3, len(prompts)):
        assert greedy_generate(model, prompts, 12, batch_size=batch_size, pad_id=0) == expected


def test_padding_id_does_not_matter(model, prompts):
    assert greedy_generate(model, prompts, 6, pad_id=0) == greedy_generate(model, prompts, 6, pad_id=17)


def test_rows_stop_after_their_first_stop_token(model, prompts):
    full = greedy_generate(model, prompts, 12)
    stop = full[3][4]
    cut = greedy_generate(model, prompts, 12, stop_ids=[stop])
    for whole, short in zip(full, cut):
        expected = whole[: whole.index(stop) + 1] if stop in whole else whole
        assert short == expected


def test_zero_new_tokens_and_no_prompts(model, prompts):
    assert greedy_generate(model, prompts, 0) == [[] for _ in prompts]
    assert greedy_generate(model, [], 5) == []


def test_continuation_beyond_the_context_window_is_refused(model):
    assert context_window(model) == 48
    with pytest.raises(ValueError, match="context window of 48"):
        greedy_generate(model, [[3] * 40], 9)


def test_rotary_models_decode_the_same_batched_and_alone(olmo2):
    """OLMo-2 (rotary positions, from conftest): left padding must not shift positions either."""
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 13, (n,), generator=gen).tolist() for n in (2, 6, 11)]
    expected = [one_by_one(olmo2, p, 8) for p in prompts]
    assert greedy_generate(olmo2, prompts, 8, batch_size=3, pad_id=0) == expected
