"""General-ability guards: held-out perplexity and nDCG@k of next-token rankings.

Perplexity is token-weighted: exp(total NLL / total predicted tokens) over all
sequences, where every position but the first of a sequence is predicted from the ones
before it and padded positions count for nothing.

nDCG@k compares the next-token ranking of a model with that of a reference model (the
unedited one) at every real position of the held-out text:

- a token's relevance comes from the reference's top-k: with the default `rank` gain (the
  paper's code), the reference's r-th token has relevance k + 1 - r (10 for its top-1,
  1 for its 10th at k = 10); with the `probability` gain, its reference probability;
  tokens outside the reference's top-k have relevance 0;
- DCG = sum over the model's top-k ranks r = 1..k of relevance(token_r) / log2(r + 1);
- nDCG = DCG / IDCG, where IDCG is the DCG of the reference's own top-k (so nDCG = 1 when
  the model ranks the reference's top-k in the same order), averaged over positions,
  with a bootstrap interval over held-out sequences.

Restricting relevance to the reference's top-k means the reference's contribution is just
k (probability, id) pairs per position, computed once and kept while the reference is
freed before the edited model is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from curvedit.data import DataError, pad_batch, read_records, token_sequences
from curvedit.distributed import map_batches
from curvedit.errors import EvaluateError
from curvedit.evaluate.generation import check_fits_context, kept_logits
from curvedit.evaluate.intervals import Interval, bootstrap_ratio
from curvedit.models import model_device


@dataclass(frozen=True)
class PerplexityResult:
    """Token-weighted perplexity.

    Attributes:
        perplexity: exp(nll / tokens).
        nll: total negative log-likelihood (nats), summed in float64.
        tokens: predicted tokens counted (padding and first positions excluded).
        sequences: sequences read.
        sequence_nll: per sequence, its summed NLL.
        sequence_tokens: per sequence, its predicted tokens.
    """

    perplexity: float
    nll: float
    tokens: int
    sequences: int
    sequence_nll: tuple[float, ...] = ()
    sequence_tokens: tuple[int, ...] = ()

    def interval(self) -> Interval:
        """Bootstrap interval of the perplexity over held-out sequences (exp of the
        interval of NLL per token, each sequence keeping its NLL and token count)."""
        per_token = bootstrap_ratio(self.sequence_nll, self.sequence_tokens)
        return Interval(value=self.perplexity, low=math.exp(per_token.low), high=math.exp(per_token.high),
                        n=per_token.n, method=per_token.method)


def _padded(chunk: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A right-padded batch: (input ids, attention mask) on `device`."""
    batch = pad_batch(chunk, pad_id, padding_side="right")
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module, sequences: Sequence[Sequence[int]], *, pad_id: int = 0, batch_size: int = 8
) -> PerplexityResult:
    """Token-weighted perplexity of the model on token sequences.

    exp(sum of -log p(x_t | x_<t) over every sequence and every position t >= 1 /
    number of such positions). Sequences are right padded; padded positions are
    neither predicted nor used as targets, so padding a batch does not change the value.
    Log-probabilities come from float32 logits; the sum is accumulated in float64.

    Args:
        model: an HF causal LM in eval mode.
        sequences: token-id sequences (none empty; a 1-token sequence predicts nothing).
        pad_id: padding id.
        batch_size: sequences per forward pass.

    Returns:
        A `PerplexityResult`.

    Raises:
        DataError: no sequence with at least 2 tokens.
        EvaluateError: a sequence longer than the model's context window.
    """
    if sequences:
        check_fits_context(model, max(len(s) for s in sequences), "a held-out sequence")
    device = model_device(model)

    def batch_nll(chunk: list[Sequence[int]]) -> list[tuple[float, int]]:
        ids, mask = _padded(chunk, pad_id, device)
        counted = mask[:, 1:].bool()
        targets = ids[:, 1:][counted]
        predicting = F.pad(counted, (0, 1))  # position t predicts token t + 1
        nll = torch.cat([F.cross_entropy(logits.float(), targets[rows], reduction="none").double()
                         for rows, logits in kept_logits(model, ids, mask, predicting)]
                        or [torch.zeros(0, dtype=torch.float64, device=device)])  # 1-token sequences predict nothing
        counts = counted.sum(dim=1).tolist()  # kept positions are row-major: split them back per sequence
        return [(float(part.sum()), count) for part, count in zip(nll.cpu().split(counts), counts)]

    per_sequence = map_batches(sequences, batch_size, batch_nll)
    total = 0.0
    for nll, _ in per_sequence:  # summed in sequence order, however the batches were shared out
        total += nll
    tokens = sum(count for _, count in per_sequence)
    if tokens == 0:
        raise DataError("perplexity needs at least one sequence of 2 or more tokens")
    return PerplexityResult(perplexity=math.exp(total / tokens), nll=total, tokens=tokens, sequences=len(sequences),
                            sequence_nll=tuple(n for n, _ in per_sequence),
                            sequence_tokens=tuple(c for _, c in per_sequence))


@dataclass(frozen=True)
class NextTokenRankings:
    """A reference model's top-k next-token predictions at every real position.

    Attributes:
        probs: float32 (N, k), the top-k probabilities, descending.
        indices: long (N, k), their token ids.
    """

    probs: torch.Tensor
    indices: torch.Tensor

    @property
    def k(self) -> int:
        """The ranking depth."""
        return self.indices.shape[1]


@torch.inference_mode()
def _topk_per_position(
    model: torch.nn.Module, sequences: Sequence[Sequence[int]], k: int, pad_id: int, batch_size: int,
    *, probabilities: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k next tokens at every real position, flattened in sequence order (on CPU).

    Args:
        model: an HF causal LM.
        sequences: token-id sequences.
        k: ranking depth.
        pad_id: padding id.
        batch_size: sequences per forward pass.
        probabilities: also normalise the top-k logits into probabilities (a log-sum-exp
            over the vocabulary per position); otherwise the values are the float32 logits.

    Returns:
        (values (N, k) descending, token ids (N, k)).

    Raises:
        DataError: no sequence.
        EvaluateError: k < 1 or above the vocabulary size, or a sequence too long.
    """
    if k < 1:
        raise EvaluateError(f"k must be at least 1, got {k}")
    if not sequences:
        raise DataError("next-token rankings need at least one sequence")
    check_fits_context(model, max(len(s) for s in sequences), "a held-out sequence")
    device = model_device(model)

    def batch_topk(chunk: list[Sequence[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ids, mask = _padded(chunk, pad_id, device)
        values, indices = [], []
        for _, logits in kept_logits(model, ids, mask, mask.bool()):
            if k > logits.shape[-1]:
                raise EvaluateError(f"k = {k} exceeds the vocabulary size {logits.shape[-1]}")
            logits = logits.float()
            top = logits.topk(k, dim=-1)
            values.append(((top.values - logits.logsumexp(dim=-1, keepdim=True)).exp() if probabilities
                           else top.values).cpu())
            indices.append(top.indices.cpu())
        return [(torch.cat(values), torch.cat(indices))]

    per_batch = map_batches(sequences, batch_size, batch_topk)
    return torch.cat([v for v, _ in per_batch]), torch.cat([i for _, i in per_batch])


def next_token_rankings(
    model: torch.nn.Module, sequences: Sequence[Sequence[int]], *, k: int = 10, pad_id: int = 0, batch_size: int = 8
) -> NextTokenRankings:
    """The reference side of nDCG@k: top-k next-token probabilities at every real position.

    Args:
        model: the reference model (the unedited one).
        sequences: token-id sequences (the same ones, in the same order, later given to
            `ndcg_at_k`).
        k: ranking depth.
        pad_id: padding id.
        batch_size: sequences per forward pass.

    Returns:
        `NextTokenRankings` with one row per real token position.

    Raises:
        DataError: no sequence.
        EvaluateError: k < 1 or above the vocabulary size, or a sequence too long.
    """
    probs, indices = _topk_per_position(model, sequences, k, pad_id, batch_size, probabilities=True)
    return NextTokenRankings(probs=probs, indices=indices)


NDCG_GAINS = ("rank", "probability")
NDCG_DEFINITIONS = {
    "rank": "relevance k+1-r for the reference's r-th token (0 outside its top-k), discount 1/log2(r+1) over the "
            "model's top-k, normalised by the reference's own DCG; mean over held-out positions",
    "probability": "relevance = the reference's probability of the token (0 outside its top-k), discount "
                   "1/log2(r+1) over the model's top-k, normalised by the reference's own DCG; mean over positions",
}


def ndcg_from_rankings(model_indices: torch.Tensor, reference: NextTokenRankings, gain: str = "rank") -> torch.Tensor:
    """Per-position nDCG@k of a model's top-k token ids against the reference's.

    Args:
        model_indices: long (N, k), the model's top-k ids per position, best first.
        reference: the reference's top-k (probabilities descending, ids) per position.
        gain: "rank" (the reference's r-th token has relevance k + 1 - r) or
            "probability" (its reference probability); tokens outside the reference's
            top-k have relevance 0.

    Returns:
        float64 (N,), nDCG in [0, 1] per position.

    Raises:
        EvaluateError: shapes that do not match, or an unknown gain.
    """
    if model_indices.shape != reference.indices.shape:
        raise EvaluateError(f"model rankings {tuple(model_indices.shape)} do not match the reference's "
                            f"{tuple(reference.indices.shape)} (same sequences and k needed)")
    if gain not in NDCG_GAINS:
        raise EvaluateError(f"unknown nDCG gain {gain!r}; choose one of {', '.join(NDCG_GAINS)}")
    k = reference.k
    discount = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64))
    if gain == "rank":
        relevance = torch.arange(k, 0, -1, dtype=torch.float64).expand(reference.indices.shape)
    else:
        relevance = reference.probs.double()
    same = model_indices[:, :, None] == reference.indices[:, None, :]
    gains = (same.double() * relevance[:, None, :]).sum(dim=-1)
    return (gains @ discount) / (relevance @ discount)


@dataclass(frozen=True)
class NDCGResult:
    """nDCG@k against a reference model.

    Attributes:
        ndcg: mean nDCG@k over positions.
        k: ranking depth.
        positions: positions averaged over.
        gain: "rank" or "probability".
        sequence_sums: per held-out sequence, the sum of its positions' nDCG.
        sequence_positions: per held-out sequence, its positions.
    """

    ndcg: float
    k: int
    positions: int
    gain: str = "rank"
    sequence_sums: tuple[float, ...] = ()
    sequence_positions: tuple[int, ...] = ()

    def interval(self) -> Interval:
        """Bootstrap interval of the mean nDCG over held-out sequences."""
        return bootstrap_ratio(self.sequence_sums, self.sequence_positions)


def ndcg_at_k(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    reference: NextTokenRankings,
    *,
    pad_id: int = 0,
    batch_size: int = 8,
    gain: str = "rank",
) -> NDCGResult:
    """Mean nDCG@k of the model's next-token rankings against a reference's (module docstring).

    Args:
        model: the model under test (e.g. the edited one).
        sequences: the sequences the reference rankings were computed on, same order.
        reference: from `next_token_rankings` on the reference model.
        pad_id: padding id.
        batch_size: sequences per forward pass.
        gain: "rank" (the reference's definition) or "probability" (see `ndcg_from_rankings`).

    Returns:
        An `NDCGResult` (its `interval()` is over held-out sequences).

    Raises:
        EvaluateError: sequences that do not match the reference rankings, or an unknown gain.
        DataError: no sequence.
    """
    _, indices = _topk_per_position(model, sequences, reference.k, pad_id, batch_size, probabilities=False)
    per_position = ndcg_from_rankings(indices, reference, gain)
    lengths = [len(s) for s in sequences]
    sums = tuple(float(part.sum()) for part in per_position.split(lengths))
    return NDCGResult(ndcg=float(per_position.mean()), k=reference.k, positions=per_position.numel(), gain=gain,
                      sequence_sums=sums, sequence_positions=tuple(lengths))


def heldout_sequences(source: Any, tokenizer: Any | None, *, seq_len: int, max_tokens: int | None,
                      text_field: str = "text") -> list[list[int]]:
    """Held-out token sequences from a corpus, packed to `seq_len` (see `curvedit.data.token_sequences`).

    Args:
        source: a corpus for `curvedit.data.read_records`.
        tokenizer: the model's tokenizer (None when the rows give input_ids).
        seq_len: sequence length.
        max_tokens: token budget (None: the whole corpus).
        text_field: JSON field with the text.

    Returns:
        The sequences.

    Raises:
        DataError: an empty corpus.
    """
    sequences = list(token_sequences(read_records(source, text_field=text_field), tokenizer, seq_len, max_tokens))
    if not sequences:
        raise DataError(f"{source}: the held-out corpus is empty")
    return sequences
