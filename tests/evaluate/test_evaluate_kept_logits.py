"""Logits only where they are needed (`kept_logits`) equal the full logits there.

The fast path applies the LM head to the decoder's hidden states at the kept positions
only; models whose logits are not `head(hidden)` (soft-capped) or whose forward takes
no `logits_to_keep` fall back to full logits. Each evaluation that uses it gives the
same result on either path.
"""

from __future__ import annotations

import weakref

import pytest
import torch
import transformers
from transformers import GPT2LMHeadModel

from curvedit.data import pad_batch
from curvedit.evaluate import generation
from curvedit.evaluate.generation import kept_logits
from curvedit.evaluate.memorization import teacher_forced_match
from curvedit.evaluate.perplexity import ndcg_at_k, next_token_rankings, perplexity
from curvedit.evaluate.tasks import choice_scores
from curvedit.evaluate.windows import Window
from tests.reciter import reciter_gpt2

VOCAB = 50


class SoftCapped(GPT2LMHeadModel):
    """GPT-2 whose logits are soft-capped after the head (as Gemma-2's are): not `head(hidden)`."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None, logits_to_keep=0):
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=use_cache, logits_to_keep=logits_to_keep)
        out.logits = 3.0 * torch.tanh(out.logits / 3.0)
        return out


class NoLogitsToKeep(torch.nn.Module):
    """A causal LM with a separable head whose forward takes no `logits_to_keep`."""

    def __init__(self, inner: GPT2LMHeadModel) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.inner.get_output_embeddings()

    def get_decoder(self) -> torch.nn.Module:
        return self.inner.get_decoder()

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=use_cache)


def tiny_llama() -> transformers.LlamaForCausalLM:
    """SmolLM2's architecture in miniature: grouped-query attention, rotary positions, a tied head."""
    torch.manual_seed(2)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                      tie_word_embeddings=True, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def soft_capped() -> SoftCapped:
    torch.manual_seed(3)
    return SoftCapped(reciter_gpt2(VOCAB).config).eval()


def padded(side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A padded batch of rows of different lengths and a random set of real positions to keep."""
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (5, 14, 9, 1)]
    batch = pad_batch(rows, 0, padding_side=side)
    keep = (torch.rand(batch["input_ids"].shape, generator=gen) < 0.6) & batch["attention_mask"].bool()
    return batch["input_ids"], batch["attention_mask"], keep


def full_logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits at every position of a padded batch (position ids that skip padding)."""
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                     use_cache=False).logits


def head_positions(model: torch.nn.Module, run) -> int:
    """How many positions `run()` sends through the model's LM head."""
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: seen.append(args[0].shape[:-1].numel()))
    try:
        run()
    finally:
        handle.remove()
    return sum(seen)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 positions, so that every batch spans several."""
    monkeypatch.setattr(generation, "HEAD_CHUNK_ELEMENTS", 3 * VOCAB)


@pytest.mark.parametrize("build", [lambda: reciter_gpt2(VOCAB), tiny_llama], ids=["gpt2-tied", "llama-tied"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_kept_positions_get_the_full_logits_and_only_they_reach_the_head(build, side, small_chunks):
    model = build()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids, mask, keep = padded(side)
    chunks = []
    used = head_positions(model, lambda: chunks.extend(kept_logits(model, ids, mask, keep)))
    assert [rows.start for rows, _ in chunks] == list(range(0, int(keep.sum()), 3))
    assert all(logits.shape[0] == rows.stop - rows.start <= 3 for rows, logits in chunks)
    torch.testing.assert_close(torch.cat([logits for _, logits in chunks]), full_logits(model, ids, mask)[keep])
    assert used == int(keep.sum()) + 2 * ids.shape[0]  # the kept positions, and the last one twice (the check)
    assert model not in generation._FULL_LOGITS


@pytest.mark.parametrize("build", [soft_capped, lambda: NoLogitsToKeep(reciter_gpt2(VOCAB))],
                         ids=["soft-capped", "no-logits_to_keep"])
def test_models_whose_logits_are_not_head_of_hidden_fall_back_to_full_logits(build, small_chunks):
    model = build()
    ids, mask, keep = padded("left")
    for _ in range(2):  # the soft-capped one is found out once, then not tried again
        got = torch.cat([logits for _, logits in kept_logits(model, ids, mask, keep)])
        torch.testing.assert_close(got, full_logits(model, ids, mask)[keep], rtol=0, atol=0)
    assert head_positions(model, lambda: list(kept_logits(model, ids, mask, keep))) == ids.numel()


@pytest.fixture
def full_logits_only(monkeypatch):
    """Make `kept_logits` take the full-logits path for some models (the computation before the fast path)."""

    def force(*models: torch.nn.Module) -> None:
        monkeypatch.setattr(generation, "_FULL_LOGITS", weakref.WeakSet(models))

    return force


def test_evaluations_give_the_same_results_on_both_paths(small_chunks, full_logits_only):
    model, other = reciter_gpt2(VOCAB, seed=4), reciter_gpt2(VOCAB, seed=6)
    gen = torch.Generator().manual_seed(5)
    rows = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (7, 12, 3, 10)]
    windows = [Window(row, torch.randint(1, VOCAB, (4,), generator=gen).tolist()) for row in rows]
    pairs = [(row[:-2], row[-2:]) for row in rows]

    def evaluations():
        rankings = next_token_rankings(model, rows, k=5, batch_size=3)
        return (teacher_forced_match(model, windows), perplexity(model, rows, batch_size=3),
                rankings.probs, rankings.indices, choice_scores(model, pairs, batch_size=3),
                ndcg_at_k(other, rows, rankings, batch_size=3).ndcg)

    fast = evaluations()
    full_logits_only(model, other)
    slow = evaluations()
    assert torch.equal(fast[0], slow[0])
    assert fast[1].tokens == slow[1].tokens
    assert fast[1].nll == pytest.approx(slow[1].nll, rel=1e-6)
    torch.testing.assert_close(fast[2], slow[2])
    assert torch.equal(fast[3], slow[3])
    assert [count for _, count in fast[4]] == [count for _, count in slow[4]]
    assert [score for score, _ in fast[4]] == pytest.approx([score for score, _ in slow[4]], rel=1e-5)
    assert fast[5] == pytest.approx(slow[5], rel=1e-6) and fast[5] < 1.0
