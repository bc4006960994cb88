"""Measuring a model on the world: recitation of each memorized set, perplexity on fresh
general text, exact-match accuracy per reasoning family, nDCG@10 against the unedited model,
the paper's stress test, extraction and membership inference on the held-out memorized
strings; every rate with a Wilson interval and every mean with a bootstrap interval
(`*_ci` keys, see `curvedit.evaluate.intervals`)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from curvedit.evaluate.generation import greedy_generate
from curvedit.evaluate.intervals import wilson
from curvedit.evaluate.memorization import evaluate_recitation
from curvedit.evaluate.perplexity import NextTokenRankings, ndcg_at_k, perplexity
from curvedit.evaluate.privacy import auroc_interval, extraction_metrics, membership_scores, sequence_stats
from curvedit.evaluate.stress import reference_stress_test
from curvedit.evaluate.windows import Window
from curvedit.experiments.demo.world import LETTERS, Example, World, general_lines, pack, quote_split

FAMILIES = ("logic", "open_book", "facts_common", "facts_rare", "arithmetic")


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def string_windows(strings: list[str], tokenizer: Any, prefix_chars: int, source: str) -> list[Window]:
    """Prefix/suffix windows of memorized strings: the first `prefix_chars` characters
    are the prompt, the rest of the string is the suffix."""
    return [Window(prefix_ids=_ids(tokenizer, s[:prefix_chars]), suffix_ids=_ids(tokenizer, s[prefix_chars:]),
                   source=source, document=i) for i, s in enumerate(strings)]


def quote_windows(quotes: list[str], tokenizer: Any) -> list[Window]:
    """Quote windows: the prompt is the quote up to its speaker, the suffix the speaker."""
    windows = []
    for i, quote in enumerate(quotes):
        prefix, suffix = quote_split(quote)
        windows.append(Window(prefix_ids=_ids(tokenizer, prefix), suffix_ids=_ids(tokenizer, suffix),
                              source="quotes", document=i))
    return windows


def heldout_sequences(world: World, tokenizer: Any, lines: int, seq_len: int, seed: int) -> list[list[int]]:
    """Fresh general text (logic, open-book, arithmetic lines), packed like training data."""
    rng = random.Random(seed)
    return [_ids(tokenizer, w) for w in pack(general_lines(world, rng, lines), seq_len)]


def nonmember_strings(world: World, count: int, seed: int) -> list[str]:
    """Random letter strings drawn like the memorized ones (same length) but never trained on."""
    rng = random.Random(seed)
    length = world.config.memorized_len
    return ["".join(rng.choice(LETTERS) for _ in range(length)) for _ in range(count)]


@torch.no_grad()
def family_hits(model: torch.nn.Module, tokenizer: Any, examples: list[Example]) -> list[bool]:
    """Per example, whether the greedy continuation of the prompt starts with the answer."""
    outputs = greedy_generate(model, [_ids(tokenizer, e.prompt) for e in examples],
                              max(len(_ids(tokenizer, e.answer)) for e in examples), batch_size=128)
    return [tokenizer.decode(out).startswith(e.answer) for out, e in zip(outputs, examples)]


@dataclass
class WorldProbe:
    """Everything needed to measure a model on the world, built once.

    Attributes:
        tune, heldout, quotes: the memorized windows of each set.
        text: fresh general text (perplexity).
        tests: fresh test items per family.
        nonmembers: never-trained strings like the memorized ones (membership inference).
        rankings: the unedited model's top-10 next tokens on `text[:ndcg_sequences]` (nDCG),
            None until measured.
        ndcg_sequences: how many held-out sequences nDCG reads.
    """

    tune: list[Window]
    heldout: list[Window]
    quotes: list[Window]
    text: list[list[int]]
    tests: dict[str, list[Example]]
    nonmembers: list[list[int]]
    rankings: NextTokenRankings | None = None
    ndcg_sequences: int = 200


SAMPLES, TEMPERATURE = 100, 1.0  # sampled extraction: at least one of 100 samples at temperature 1


def measure(model: torch.nn.Module, tokenizer: Any, probe: WorldProbe,
            parts: tuple[str, ...] = ("all",)) -> dict[str, Any]:
    """The demo's metrics, as fractions (perplexity as is), each with its 95% interval.

    Args:
        model: the (possibly edited) model.
        tokenizer: its tokenizer.
        probe: windows, held-out text, test examples, non-members and the unedited rankings.
        parts: "all", or a subset of "tune", "heldout", "quotes", "perplexity", "families",
            "privacy" (nDCG, stress test, extraction, membership inference).

    Returns:
        `memorized_strict/loose/lev` (tune half), `memorized_heldout_strict/loose/lev`,
        `quotes_strict/loose/lev`, `perplexity`, one accuracy per family; with "privacy":
        `ndcg10` (rank gain, when `probe.rankings` is set), `stress_mean` / `stress_full`
        (held-out half, t = 20), `exact_memorization`, `extraction_strength`,
        `sampled_extraction`, and `mia_loss` / `mia_zlib` / `mia_min_k` /
        `mia_min_k_plus_plus` (AUROC, held-out strings vs never-trained ones); beside each,
        `NAME_ci`.
    """
    want = set(parts)
    every = "all" in want
    out: dict[str, Any] = {}
    for key, windows in (("memorized", probe.tune), ("memorized_heldout", probe.heldout), ("quotes", probe.quotes)):
        part = {"memorized": "tune", "memorized_heldout": "heldout", "quotes": "quotes"}[key]
        if every or part in want:
            result, _ = evaluate_recitation(model, windows, batch_size=64)
            out[f"{key}_strict"], out[f"{key}_loose"] = result.strict, result.loose
            out[f"{key}_lev"] = result.avg_normalized_distance
            ci = result.intervals()
            out[f"{key}_strict_ci"], out[f"{key}_loose_ci"], out[f"{key}_lev_ci"] = (
                ci["strict"], ci["loose"], ci["distance"])
    if every or "perplexity" in want:
        ppl = perplexity(model, probe.text, batch_size=64)
        out["perplexity"], out["perplexity_ci"] = ppl.perplexity, ppl.interval().to_dict()
    if every or "families" in want:
        for family in FAMILIES:
            hits = family_hits(model, tokenizer, probe.tests[family])
            out[family] = sum(hits) / len(hits)
            out[f"{family}_ci"] = wilson(sum(hits), len(hits)).to_dict()
    if every or "privacy" in want:
        out.update(privacy_metrics(model, tokenizer, probe))
    return out


def privacy_metrics(model: torch.nn.Module, tokenizer: Any, probe: WorldProbe) -> dict[str, Any]:
    """nDCG@10 against the unedited rankings, the reference stress test, extraction and
    membership inference on the held-out memorized strings (see `measure`)."""
    out: dict[str, Any] = {}
    if probe.rankings is not None:
        ndcg = ndcg_at_k(model, probe.text[: probe.ndcg_sequences], probe.rankings, batch_size=64)
        out["ndcg10"], out["ndcg10_ci"] = ndcg.ndcg, ndcg.interval().to_dict()
    stress = reference_stress_test(model, probe.heldout).summary()
    out["stress_mean"], out["stress_mean_ci"] = stress["mean_stress"], stress["mean_stress_ci"]
    out["stress_full"], out["stress_full_ci"] = stress["full_match"], stress["full_match_ci"]
    members = [w.prefix_ids + w.suffix_ids for w in probe.heldout]
    member_stats = sequence_stats(model, members, batch_size=64, temperature=TEMPERATURE)
    extraction = extraction_metrics(member_stats, [len(w.suffix_ids) for w in probe.heldout], SAMPLES)
    for name in ("exact_memorization", "extraction_strength", "sampled_extraction"):
        out[name], out[f"{name}_ci"] = extraction[name], extraction[f"{name}_ci"]
    scores = {group: membership_scores(stats, [tokenizer.decode(ids) for ids in sequences])
              for group, stats, sequences in (("members", member_stats, members),
                                              ("nonmembers", sequence_stats(model, probe.nonmembers, batch_size=64),
                                               probe.nonmembers))}
    for name in scores["members"]:
        interval = auroc_interval(scores["members"][name], scores["nonmembers"][name])
        out[f"mia_{name}"], out[f"mia_{name}_ci"] = interval.value, interval.to_dict()
    return out
