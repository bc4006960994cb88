"""find-memorized and recitation on a tiny GPT-2 trained to recite four texts."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch

from curvedit.data import DataError, Record, write_jsonl
from curvedit.evaluate import memorization
from curvedit.evaluate.generation import greedy_generate
from curvedit.evaluate.memorization import (
    FindOptions,
    evaluate_recitation,
    find_memorized,
    found_to_row,
    teacher_forced_match,
)
from curvedit.evaluate.windows import Window, read_memorized
from tests.reciter import HELDOUT, MEMORIZED, PREFIX, SUFFIX, trained_reciter


@pytest.fixture(scope="module")
def reciter():
    return trained_reciter()


@pytest.fixture()
def corpus(tmp_path):
    """Memorized and held-out texts, interleaved, in one JSONL file."""
    path = tmp_path / "corpus.jsonl"
    texts = [t for pair in zip(MEMORIZED, HELDOUT) for t in pair]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def options(**kwargs):
    return FindOptions(prefix_len=PREFIX, suffix_len=SUFFIX, batch_size=3, progress=False, **kwargs)


def test_finds_exactly_the_trained_texts(reciter, corpus):
    result = find_memorized(reciter.model, reciter.tokenizer, corpus, options())
    found = [f.window.prefix_ids + f.window.suffix_ids for f in result.found]
    assert [reciter.tokenizer.decode(ids) for ids in found] == MEMORIZED
    assert result.windows == 8 and result.memorized == 4 and result.duplicates == 0
    assert all(f.memorized and all(f.match) and f.generated_ids == f.window.suffix_ids for f in result.found)
    assert [(f.window.document, f.window.offset) for f in result.found] == [(0, 0), (2, 0), (4, 0), (6, 0)]


def test_keep_all_decodes_every_window(reciter, corpus):
    result = find_memorized(reciter.model, reciter.tokenizer, corpus, options(keep_all=True))
    assert [f.memorized for f in result.found] == [True, False] * 4
    assert all(len(f.match) == SUFFIX for f in result.found)
    assert not all(result.found[1].match)


def test_prefilter_agrees_with_greedy_decoding(reciter):
    windows = [Window(ids[:PREFIX], ids[PREFIX:]) for ids in
               (reciter.tokenizer(t, add_special_tokens=False)["input_ids"] for t in MEMORIZED + HELDOUT)]
    assert teacher_forced_match(reciter.model, windows).all(dim=1).tolist() == [True] * 4 + [False] * 4


def test_prefilter_is_unchanged_by_left_padding(reciter):
    ids = reciter.tokenizer(MEMORIZED[3], add_special_tokens=False)["input_ids"]
    windows = [Window(ids[start:PREFIX], ids[PREFIX:]) for start in (0, 3, 9)]  # prefixes of 16, 13 and 7 tokens
    together = teacher_forced_match(reciter.model, windows, pad_id=5)
    alone = torch.cat([teacher_forced_match(reciter.model, [w]) for w in windows])
    assert torch.equal(together, alone) and bool(together[0].all())


def test_sliding_windows_with_a_stride_and_a_cap(reciter):
    text = MEMORIZED[0] + MEMORIZED[1]  # 56 tokens
    records = [Record(text=text, input_ids=None, source="mem", index=0)]
    result = find_memorized(reciter.model, reciter.tokenizer, records, options(stride=4, keep_all=True, max_windows=5))
    assert [f.window.offset for f in result.found] == [0, 4, 8, 12, 16]
    assert result.found[0].memorized  # the first window is the trained text itself


def test_quotes_mode_uses_the_last_tokens_as_suffix(reciter, tmp_path):
    path = tmp_path / "quotes.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in (MEMORIZED[2], HELDOUT[2])))
    result = find_memorized(reciter.model, reciter.tokenizer, path, options(mode="quotes"))
    assert len(result.found) == 1
    window = result.found[0].window
    assert reciter.tokenizer.decode(window.suffix_ids) == MEMORIZED[2][-SUFFIX:]
    assert reciter.tokenizer.decode(window.prefix_ids) == MEMORIZED[2][:-SUFFIX]


def test_near_duplicate_windows_are_dropped(reciter):
    records = [Record(text=MEMORIZED[0], input_ids=None, source="a", index=i) for i in range(3)]
    result = find_memorized(reciter.model, reciter.tokenizer, records, options(dedup_threshold=0.8))
    assert (len(result.found), result.memorized, result.duplicates) == (1, 3, 2)


def test_max_memorized_stops_early(reciter, corpus):
    result = find_memorized(reciter.model, reciter.tokenizer, corpus, options(max_memorized=2))
    assert len(result.found) == 2


def test_candidates_of_several_batches_are_decoded_together(reciter, corpus, monkeypatch):
    """Batches of 2 windows hold one memorized window each: candidates wait for a full decoding batch,
    or for as many as could reach `max_memorized`, which stops where one batch at a time would."""
    decoded = []

    def counting_generate(model, prompts, *args, **kwargs):
        decoded.append(len(prompts))
        return greedy_generate(model, prompts, *args, **kwargs)

    monkeypatch.setattr(memorization, "greedy_generate", counting_generate)
    pairs = FindOptions(prefix_len=PREFIX, suffix_len=SUFFIX, batch_size=2, progress=False)
    result = find_memorized(reciter.model, reciter.tokenizer, corpus, pairs)
    assert [f.window.document for f in result.found] == [0, 2, 4, 6] and decoded == [2, 2]
    capped = find_memorized(reciter.model, reciter.tokenizer, corpus, replace(pairs, max_memorized=3))
    assert (capped.windows, capped.prefiltered, capped.memorized, len(capped.found)) == (6, 3, 3, 3)
    assert decoded[2:] == [2, 1]


def test_input_id_rows_need_no_tokenizer(reciter):
    ids = reciter.tokenizer(MEMORIZED[1], add_special_tokens=False)["input_ids"]
    result = find_memorized(reciter.model, None, [Record(None, ids, "ids", 0)], options())
    assert result.found[0].window.prefix_ids == ids[:PREFIX]


def test_sampling_is_seeded_and_uniform_over_windows(reciter, corpus):
    first = find_memorized(reciter.model, reciter.tokenizer, corpus, options(sample=3, keep_all=True, seed=5))
    again = find_memorized(reciter.model, reciter.tokenizer, corpus, options(sample=3, keep_all=True, seed=5))
    assert result_ids(first) == result_ids(again) and first.windows == 3


def result_ids(result):
    return [f.window.prefix_ids for f in result.found]


def test_strict_recall_is_full_and_drops_when_weights_are_scrambled(reciter):
    windows = [Window(ids[:PREFIX], ids[PREFIX:]) for ids in
               (reciter.tokenizer(t, add_special_tokens=False)["input_ids"] for t in MEMORIZED)]
    before, generated = evaluate_recitation(reciter.model, windows, batch_size=3)
    assert (before.strict, before.loose, before.avg_normalized_distance) == (1.0, 1.0, 0.0)
    assert generated == [w.suffix_ids for w in windows]
    scrambled = copy.deepcopy(reciter.model)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for param in scrambled.transformer.h.parameters():
            param.copy_(param.flatten()[torch.randperm(param.numel(), generator=gen)].view_as(param))
    after, _ = evaluate_recitation(scrambled, windows)
    assert after.strict < 0.5 and after.avg_normalized_distance > 0.3


def test_rows_round_trip_through_jsonl(reciter, corpus, tmp_path):
    result = find_memorized(reciter.model, reciter.tokenizer, corpus, options())
    out = write_jsonl((found_to_row(f, reciter.tokenizer) for f in result.found), tmp_path / "mem.jsonl")
    row = json.loads(out.read_text().splitlines()[0])
    assert row["prefix"] + row["suffix"] == MEMORIZED[0] and row["match"] == [True] * SUFFIX
    assert {"prefix_ids", "suffix_ids", "source", "document", "offset"} <= set(row)
    assert [w.suffix_ids for w in read_memorized(out)] == [f.window.suffix_ids for f in result.found]
    with pytest.raises(FileExistsError, match="overwrite"):
        write_jsonl([], out)


def test_hand_made_text_rows_are_tokenized(reciter, tmp_path):
    path = tmp_path / "quotes.jsonl"
    path.write_text(json.dumps({"prefix": "abc", "suffix": "de"}) + "\n" + json.dumps({"memorized": False}) + "\n")
    [window] = read_memorized(path, reciter.tokenizer)
    assert reciter.tokenizer.decode(window.prefix_ids + window.suffix_ids) == "abcde"
    path.write_text('{"prefix": "abc"}\n')
    with pytest.raises(DataError, match=r"quotes.jsonl:1: row needs 'suffix_ids'"):
        read_memorized(path, reciter.tokenizer)


def test_empty_corpus_is_an_error(reciter, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        find_memorized(reciter.model, reciter.tokenizer, empty, options())


def test_corpus_without_a_long_enough_document_is_an_error(reciter):
    records = [Record(text="abc", input_ids=None, source="short", index=0)]
    with pytest.raises(DataError, match=r"none of its 1 documents has at least 28 tokens"):
        find_memorized(reciter.model, reciter.tokenizer, records, options())


def test_window_longer_than_the_context_is_an_error(reciter, corpus):
    with pytest.raises(ValueError, match="prefix \\+ suffix \\(60 \\+ 8\\).*context window of 64"):
        find_memorized(reciter.model, reciter.tokenizer, corpus,
                       FindOptions(prefix_len=60, suffix_len=8, progress=False))
