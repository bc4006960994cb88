"""The trained reciter of the evaluation tests (not a test module).

`trained_reciter()` is a 2-layer GPT-2 over a character tokenizer, trained for about a
second until it recites `MEMORIZED` documents verbatim; `HELDOUT` documents come from
the same generator and were never trained on. It is built once per test session.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel

from curvedit.chartok import build_char_tokenizer
from tests.tiny_models import tiny_gpt2

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
PREFIX, SUFFIX = 16, 12


def _random_texts(count: int, length: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(length)) for _ in range(count)]


MEMORIZED = _random_texts(4, PREFIX + SUFFIX, seed=1)
HELDOUT = _random_texts(4, PREFIX + SUFFIX, seed=2)


def reciter_gpt2(vocab: int, *, n_positions: int = 64, seed: int = 0) -> GPT2LMHeadModel:
    """The reciter's size of `tiny_gpt2`: n_embd 64, float32, EOS 1 and pad 0, default attention."""
    return tiny_gpt2(seed=seed, vocab=vocab, n_embd=64, n_positions=n_positions, dtype=torch.float32, eos_id=1,
                     pad_id=0, attn=None)


@dataclass
class Reciter:
    """A trained tiny model and its tokenizer."""

    model: GPT2LMHeadModel
    tokenizer: object


@functools.lru_cache(maxsize=1)
def trained_reciter() -> Reciter:
    """Train a tiny GPT-2 until greedy teacher forcing reproduces every MEMORIZED text (one torch thread)."""
    return _train_reciter()


def _train_reciter() -> Reciter:
    tokenizer = build_char_tokenizer(ALPHABET)
    model = reciter_gpt2(len(tokenizer), seed=0)
    ids = torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"] for t in MEMORIZED])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(400):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 20 == 19:
            with torch.no_grad():
                predicted = model(input_ids=ids).logits[:, :-1].argmax(-1)
            if bool((predicted == ids[:, 1:]).all()):
                break
    else:
        raise RuntimeError("the tiny model did not learn to recite its training texts")
    model.eval()
    return Reciter(model=model, tokenizer=tokenizer)


def write_workspace(root: Path) -> Path:
    """The trained model saved in `root/model`, a corpus (memorized + held-out texts),
    held-out text and a tasks folder with one generate task (recite the memorized texts)."""
    reciter = trained_reciter()
    reciter.model.save_pretrained(root / "model")
    reciter.tokenizer.save_pretrained(root / "model")
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in MEMORIZED + HELDOUT))
    (root / "heldout.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in HELDOUT))
    (root / "tasks").mkdir()
    (root / "tasks" / "recall.jsonl").write_text("".join(
        json.dumps({"type": "generate", "prompt": t[:PREFIX], "answer": t[PREFIX:], "max_new_tokens": SUFFIX}) + "\n"
        for t in MEMORIZED))
    return root
