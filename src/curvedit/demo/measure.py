"""Measuring a model on the world: recitation of each memorized set, perplexity on fresh
general text, and exact-match accuracy per reasoning family."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from curvedit.demo.world import Example, World, general_lines, pack, quote_split
from curvedit.evaluate.generation import greedy_generate
from curvedit.evaluate.memorization import evaluate_recitation
from curvedit.windows import Window
from curvedit.evaluate.perplexity import perplexity

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


@torch.no_grad()
def family_accuracy(model: torch.nn.Module, tokenizer: Any, examples: list[Example]) -> float:
    """Share of examples whose greedy continuation of the prompt equals the answer."""
    outputs = greedy_generate(model, [_ids(tokenizer, e.prompt) for e in examples],
                              max(len(_ids(tokenizer, e.answer)) for e in examples), batch_size=128)
    hits = [tokenizer.decode(out).startswith(e.answer) for out, e in zip(outputs, examples)]
    return sum(hits) / len(hits)


@dataclass
class WorldProbe:
    """Everything needed to measure a model on the world, built once."""

    tune: list[Window]
    heldout: list[Window]
    quotes: list[Window]
    text: list[list[int]]
    tests: dict[str, list[Example]]


def measure(model: torch.nn.Module, tokenizer: Any, probe: WorldProbe,
            parts: tuple[str, ...] = ("all",)) -> dict[str, float]:
    """The demo's metrics, as fractions (perplexity as is).

    Args:
        model: the (possibly edited) model.
        tokenizer: its tokenizer.
        probe: windows, held-out text and test examples.
        parts: "all", or a subset of "tune", "heldout", "quotes", "perplexity", "families".

    Returns:
        `memorized_strict/loose/lev` (tune half), `memorized_heldout_strict/loose/lev`,
        `quotes_strict/loose/lev`, `perplexity`, and one accuracy per family.
    """
    want = set(parts)
    every = "all" in want
    out: dict[str, float] = {}
    for key, windows in (("memorized", probe.tune), ("memorized_heldout", probe.heldout), ("quotes", probe.quotes)):
        part = {"memorized": "tune", "memorized_heldout": "heldout", "quotes": "quotes"}[key]
        if every or part in want:
            result, _ = evaluate_recitation(model, windows, batch_size=64)
            out[f"{key}_strict"] = result.strict
            out[f"{key}_loose"] = result.loose
            out[f"{key}_lev"] = result.avg_normalized_distance
    if every or "perplexity" in want:
        out["perplexity"] = perplexity(model, probe.text, batch_size=64).perplexity
    if every or "families" in want:
        for family in FAMILIES:
            out[family] = family_accuracy(model, tokenizer, probe.tests[family])
    return out
