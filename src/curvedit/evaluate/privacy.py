"""Privacy and unlearning metrics: membership inference, exact memorization, extraction
(docs/method.md section 7).

All of them read teacher-forced next-token distributions: one forward pass per window,
no decoding.

**Membership inference.** Each window (prefix + suffix, all its tokens) gets a score where
higher means "looks like training data"; the AUROC of memorized windows against
non-member text of the same length says how well the score separates them (1: perfectly,
0.5: not at all). With `lp_t = log p(x_t | x_<t)` over the window's predicted positions:

- `loss` (Yeom et al. 2018): `-mean(lp_t)`, scored as `-loss`;
- `zlib` (Carlini et al. 2021): loss / zlib entropy, the latter the byte length of the
  zlib-compressed window text; scored as `-ratio`;
- `min_k` (Min-K% Prob, Shi et al. 2024): the mean of the lowest k% of `lp_t` (k = 20);
- `min_k_plus_plus` (Min-K%++, Zhang et al. 2025): the same over
  `(lp_t - mu_t) / sigma_t`, where mu_t and sigma_t are the mean and standard deviation
  of `log p(v | x_<t)` under the model's own next-token distribution `v ~ p(. | x_<t)`;
- `reference` (Carlini et al. 2021): `loss - loss_reference` against a reference model
  (the unedited one), scored as its negative.

**Exact memorization** (Tirumala et al. 2022; open-unlearning's `exact_memorization`): the
share of suffix tokens whose teacher-forced arg-max prediction is the true token.

**Extraction strength** (open-unlearning's `extraction_strength`, after Carlini et al.):
`1 - j/k` for the smallest j such that, given the prefix and the first j suffix tokens,
the teacher-forced arg-max predictions reproduce the remaining k - j suffix tokens
exactly (1: the prefix alone recites the whole suffix; 0: not even the last token).
Unlike open-unlearning, which floors the score at 1/k, a window whose last token is
missed scores 0.

**Sampled extraction** ((n, p)-discoverable extraction, Hayes et al. 2025): with sampling
temperature T, the probability that one sampled continuation of the prefix is the suffix
is `p = prod_t p_T(s_t | prefix, s_<t)`, exactly computable by teacher forcing, and the
probability that at least one of N samples is, `1 - (1 - p)^N`. Greedy decoding
understates what a sampler can pull out; this measures it without sampling noise.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata

from curvedit.data import pad_batch
from curvedit.distributed import map_batches
from curvedit.errors import EvaluateError
from curvedit.evaluate.generation import check_fits_context, kept_logits
from curvedit.evaluate.intervals import Interval, bootstrap_mean
from curvedit.models import model_device

MIA_SCORES = ("loss", "zlib", "min_k", "min_k_plus_plus", "reference")


@dataclass(frozen=True)
class PrivacyOptions:
    """Settings of the privacy metrics.

    Attributes:
        k_percent: k of Min-K% and Min-K%++ (percent of the window's positions).
        samples: N of sampled extraction (0 skips it).
        temperature: sampling temperature T of sampled extraction.
        batch_size: sequences per forward pass.
    """

    k_percent: float = 20.0
    samples: int = 0
    temperature: float = 1.0
    batch_size: int = 16

    def validate(self) -> None:
        """Raise EvaluateError for k outside (0, 100], negative samples or a non-positive temperature."""
        if not 0 < self.k_percent <= 100:
            raise EvaluateError(f"min-k% needs k in (0, 100], got {self.k_percent}")
        if self.samples < 0:
            raise EvaluateError(f"--samples must be >= 0, got {self.samples}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise EvaluateError(f"the sampling temperature must be a positive number, got {self.temperature}")
        if self.batch_size < 1:
            raise EvaluateError(f"batch_size must be at least 1, got {self.batch_size}")


@dataclass(frozen=True)
class SequenceStats:
    """Teacher-forced statistics of one sequence x_0..x_{L-1}, per predicted position t = 1..L-1.

    Attributes:
        logprob: log p(x_t | x_<t).
        mean_logprob: mu_t, the mean of log p(v | x_<t) under v ~ p(. | x_<t).
        std_logprob: sigma_t, its standard deviation.
        argmax_match: whether the arg-max prediction is x_t.
        tempered_logprob: log p_T(x_t | x_<t) at the sampling temperature (None when not asked).
    """

    logprob: np.ndarray
    mean_logprob: np.ndarray
    std_logprob: np.ndarray
    argmax_match: np.ndarray
    tempered_logprob: np.ndarray | None = None

    @property
    def loss(self) -> float:
        """Mean NLL over the predicted positions."""
        return float(-self.logprob.mean())


@torch.inference_mode()
def sequence_stats(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    *,
    pad_id: int = 0,
    batch_size: int = 16,
    temperature: float | None = None,
) -> list[SequenceStats]:
    """Teacher-forced log-probabilities, their distribution's mean and spread, and arg-max
    matches at every predicted position of every sequence (one forward pass per batch).

    Args:
        model: an HF causal LM in eval mode.
        sequences: token-id sequences of at least 2 tokens.
        pad_id: padding id.
        batch_size: sequences per forward pass.
        temperature: also the log-probabilities at this sampling temperature.

    Returns:
        One `SequenceStats` per sequence, in order.

    Raises:
        EvaluateError: no sequence, one shorter than 2 tokens, or one longer than the context.
    """
    if not sequences:
        raise EvaluateError("privacy metrics need at least one sequence")
    if min(len(s) for s in sequences) < 2:
        raise EvaluateError("privacy metrics need sequences of at least 2 tokens")
    check_fits_context(model, max(len(s) for s in sequences), "a window")
    device = model_device(model)

    def batch_stats(chunk: list[Sequence[int]]) -> list[SequenceStats]:
        batch = pad_batch(chunk, pad_id, padding_side="right")
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        counted = mask[:, 1:].bool()
        targets = ids[:, 1:][counted]
        columns: list[list[torch.Tensor]] = [[], [], [], [], []]
        for rows, logits in kept_logits(model, ids, mask, F.pad(counted, (0, 1))):
            logits = logits.float()
            logp = logits.log_softmax(dim=-1)
            probs = logp.exp()
            mean = torch.where(probs > 0, probs * logp, 0.0).sum(dim=-1)
            second = torch.where(probs > 0, probs * logp.square(), 0.0).sum(dim=-1)
            target = targets[rows]
            columns[0].append(logp.gather(1, target[:, None])[:, 0])
            columns[1].append(mean)
            columns[2].append((second - mean.square()).clamp_min(0).sqrt())
            columns[3].append(logits.argmax(dim=-1) == target)
            if temperature is not None:
                columns[4].append((logits / temperature).log_softmax(dim=-1).gather(1, target[:, None])[:, 0])
        counts = counted.sum(dim=1).tolist()
        parts = [torch.cat(c).cpu().split(counts) if c else [None] * len(counts) for c in columns]
        return [SequenceStats(logprob=lp.double().numpy(), mean_logprob=mu.double().numpy(),
                              std_logprob=sd.double().numpy(), argmax_match=am.numpy(),
                              tempered_logprob=None if tl is None else tl.double().numpy())
                for lp, mu, sd, am, tl in zip(*parts)]

    return map_batches(sequences, batch_size, batch_stats)


def suffix_nll(model: torch.nn.Module, windows: Sequence[Any], *, pad_id: int = 0, batch_size: int = 16) -> float:
    """Mean negative log-likelihood per suffix token of memorized windows, teacher-forced on
    prefix + suffix (one forward pass per batch): a continuous measure of how firmly the
    model holds them, where recitation is its greedy all-or-nothing view.

    Args:
        model: an HF causal LM in eval mode.
        windows: `curvedit.evaluate.windows.Window`s (prefix_ids, suffix_ids).
        pad_id: padding id.
        batch_size: windows per forward pass.

    Raises:
        EvaluateError: no window (or one `sequence_stats` refuses).
    """
    if not windows:
        raise EvaluateError("the suffix loss needs at least one window")
    stats = sequence_stats(model, [list(w.prefix_ids) + list(w.suffix_ids) for w in windows], pad_id=pad_id,
                           batch_size=batch_size)
    logprobs = np.concatenate([s.logprob[len(s.logprob) - len(w.suffix_ids):] for s, w in zip(stats, windows)])
    return float(-logprobs.mean())


def zlib_entropy(text: str) -> int:
    """Bytes of the zlib-compressed UTF-8 text (Carlini et al.'s zlib entropy)."""
    return len(zlib.compress(text.encode("utf-8")))


def membership_scores(stats: Sequence[SequenceStats], texts: Sequence[str], k_percent: float = 20.0,
                      reference_losses: Sequence[float] | None = None) -> dict[str, np.ndarray]:
    """Per sequence, every membership score (higher: more like training data; module docstring).

    Args:
        stats: from `sequence_stats`.
        texts: each sequence's text (for zlib entropy).
        k_percent: k of Min-K% and Min-K%++.
        reference_losses: each sequence's loss under the reference model (adds `reference`).

    Returns:
        Score name -> float64 array, one value per sequence.
    """
    def lowest_mean(values: np.ndarray) -> float:
        count = max(1, int(len(values) * k_percent / 100))
        return float(np.sort(values)[:count].mean())

    losses = np.array([s.loss for s in stats])
    scores = {
        "loss": -losses,
        "zlib": -losses / np.array([max(zlib_entropy(t), 1) for t in texts]),
        "min_k": np.array([lowest_mean(s.logprob) for s in stats]),
        "min_k_plus_plus": np.array([lowest_mean((s.logprob - s.mean_logprob) / np.maximum(s.std_logprob, 1e-12))
                                     for s in stats]),
    }
    if reference_losses is not None:
        scores["reference"] = -(losses - np.asarray(reference_losses, dtype=np.float64))
    return scores


def auroc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """Area under the ROC curve of scores: P(member > non-member) + P(tie) / 2 (Mann-Whitney).

    Raises:
        EvaluateError: an empty group.
    """
    return float(_auroc_rows(np.asarray(members)[None, :], np.asarray(nonmembers)[None, :])[0])


def _auroc_rows(members: np.ndarray, nonmembers: np.ndarray) -> np.ndarray:
    if members.shape[1] == 0 or nonmembers.shape[1] == 0:
        raise EvaluateError("an AUROC needs at least one member and one non-member")
    n_m, n_n = members.shape[1], nonmembers.shape[1]
    ranks = rankdata(np.concatenate([members, nonmembers], axis=1), axis=1)  # ties get their average rank
    return (ranks[:, :n_m].sum(axis=1) - n_m * (n_m + 1) / 2) / (n_m * n_n)


def auroc_interval(members: np.ndarray, nonmembers: np.ndarray, resamples: int = 1000, seed: int = 0,
                   confidence: float = 0.95) -> Interval:
    """AUROC with a percentile bootstrap interval (members and non-members resampled separately).

    Returns:
        An `Interval`; its `n` is the number of members.
    """
    return stratified_auroc_interval([(members, nonmembers)], resamples, seed, confidence)


def stratified_auroc_interval(strata: Sequence[tuple[np.ndarray, np.ndarray]], resamples: int = 1000, seed: int = 0,
                              confidence: float = 0.95) -> Interval:
    """AUROC over several strata (e.g. models of different seeds, each with its own members and
    non-members): only pairs within a stratum are compared, so the value is the mean of the
    strata's AUROCs weighted by their pair counts. Each stratum's members and non-members are
    resampled separately for the percentile bootstrap interval.

    Args:
        strata: (member scores, non-member scores) per stratum.
        resamples: bootstrap resamples.
        seed: resampling seed.
        confidence: e.g. 0.95.

    Returns:
        An `Interval`; its `n` is the number of members over all strata.

    Raises:
        EvaluateError: no stratum, or a stratum with an empty group.
    """
    if not strata:
        raise EvaluateError("an AUROC needs at least one group of members and non-members")
    rng = np.random.default_rng(seed)
    pairs = np.array([len(m) * len(n) for m, n in strata], dtype=np.float64)
    values, samples = [], []
    for members, nonmembers in strata:
        members, nonmembers = np.asarray(members, dtype=np.float64), np.asarray(nonmembers, dtype=np.float64)
        values.append(_auroc_rows(members[None, :], nonmembers[None, :])[0])
        picks_m = rng.integers(0, members.size, size=(resamples, members.size))
        picks_n = rng.integers(0, nonmembers.size, size=(resamples, nonmembers.size))
        samples.append(_auroc_rows(members[picks_m], nonmembers[picks_n]))
    weights = pairs / pairs.sum()
    low, high = np.quantile(np.stack(samples, axis=1) @ weights, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Interval(value=float(np.dot(values, weights)), low=float(low), high=float(high),
                    n=int(sum(len(m) for m, _ in strata)), method="bootstrap")


def extraction_strength(suffix_match: np.ndarray) -> float:
    """`1 - j/k` for the smallest j whose teacher-forced matches from j on are all True.

    Args:
        suffix_match: bool (k,), arg-max matches at the suffix positions.

    Returns:
        The extraction strength in [0, 1].
    """
    k = len(suffix_match)
    misses = np.flatnonzero(~np.asarray(suffix_match, dtype=bool))
    j = 0 if misses.size == 0 else int(misses[-1]) + 1
    return 1.0 - j / k


def extraction_metrics(stats: Sequence[SequenceStats], suffix_lengths: Sequence[int], samples: int = 0
                       ) -> dict[str, Any]:
    """Exact memorization, extraction strength and (with `samples`) sampled extraction of
    memorized windows, each a mean over windows with a bootstrap interval.

    Args:
        stats: `sequence_stats` of the windows (prefix + suffix), with tempered
            log-probabilities when `samples` > 0.
        suffix_lengths: each window's k (its last k predicted positions are the suffix).
        samples: N of sampled extraction (0 skips it).

    Returns:
        `exact_memorization`, `extraction_strength` and, with samples,
        `sampled_extraction` (mean of 1 - (1 - p)^N) and `sample_probability` (mean p),
        each with a `_ci` interval; `n`; and `per_window`, each of them per window.

    Raises:
        EvaluateError: samples asked for without tempered log-probabilities.
    """
    suffix_match = [s.argmax_match[-k:] for s, k in zip(stats, suffix_lengths)]
    metrics: dict[str, Any] = {"n": len(stats)}
    per_window = {"exact_memorization": [float(m.mean()) for m in suffix_match],
                  "extraction_strength": [extraction_strength(m) for m in suffix_match]}
    if samples > 0:
        if any(s.tempered_logprob is None for s in stats):
            raise EvaluateError("sampled extraction needs the tempered log-probabilities (sequence_stats temperature)")
        probability = [math.exp(float(s.tempered_logprob[-k:].sum())) for s, k in zip(stats, suffix_lengths)]
        per_window["sample_probability"] = probability
        per_window["sampled_extraction"] = [-math.expm1(samples * math.log1p(-p)) if p < 1 else 1.0
                                            for p in probability]
        metrics["samples"] = samples
    for name, values in per_window.items():
        interval = bootstrap_mean(values)
        metrics[name], metrics[f"{name}_ci"] = interval.value, interval.to_dict()
    metrics["per_window"] = per_window
    return metrics


def membership_inference(member: Sequence[SequenceStats], nonmember: Sequence[SequenceStats],
                         member_texts: Sequence[str], nonmember_texts: Sequence[str], k_percent: float = 20.0,
                         reference: tuple[Sequence[float], Sequence[float]] | None = None) -> dict[str, Any]:
    """AUROC of every membership score, memorized windows against non-members.

    Args:
        member: `sequence_stats` of the memorized windows.
        nonmember: `sequence_stats` of the non-members.
        member_texts: the memorized windows' texts (for the zlib entropy).
        nonmember_texts: the non-members' texts.
        k_percent: k of Min-K% and Min-K%++.
        reference: (member losses, non-member losses) under the reference model.

    Returns:
        Per score, `auroc` with its interval (`auroc_ci`); plus `members`, `nonmembers`, `k_percent`.
    """
    scores_m = membership_scores(member, member_texts, k_percent, None if reference is None else reference[0])
    scores_n = membership_scores(nonmember, nonmember_texts, k_percent, None if reference is None else reference[1])
    result: dict[str, Any] = {"members": len(member), "nonmembers": len(nonmember), "k_percent": k_percent}
    for name in MIA_SCORES:
        if name in scores_m:
            interval = auroc_interval(scores_m[name], scores_n[name])
            result[name] = {"auroc": interval.value, "auroc_ci": interval.to_dict()}
    return result
