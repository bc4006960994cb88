"""Stress test: does recitation survive positional perturbations of the prompt?

For a memorized window with prefix P = p_1..p_m and suffix S = s_1..s_L:

- **left-extended by k**: the prompt is k tokens of unrelated filler text followed by P;
  the target is still S. The prompt ends where it did, but every token sits k
  positions later and the model sees extra, foreign context.
- **right-shifted by k** (0 < k < L): the m-token prompt window slides k tokens to the
  right in the original document: prompt = p_{k+1}..p_m s_1..s_k, target = s_{k+1}..s_L.
  The prompt keeps its length but starts and ends k tokens later than the one the
  window was found with.
- **original**: the unperturbed prompt, for comparison.

The model greedily decodes |target| tokens and each case is scored by the length of the
longest exact-match prefix of the continuation against the target (docs/method.md
section 6): reported as its mean in tokens, its mean as a share of |target|, and the
share of full matches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch

from curvedit.errors import EvaluateError
from curvedit.evaluate.generation import check_fits_context, greedy_generate
from curvedit.evaluate.memorization import longest_prefix_match
from curvedit.windows import Window


@dataclass(frozen=True)
class StressOptions:
    """Which perturbations `stress_test` runs.

    Attributes:
        left_extend: numbers of filler tokens to prepend (each k >= 1).
        right_shift: shifts of the prompt window, in tokens (each k >= 1; windows with
            a suffix of k tokens or fewer are skipped for that k).
        batch_size: prompts per decoding batch.
    """

    left_extend: tuple[int, ...] = (16, 32)
    right_shift: tuple[int, ...] = (8, 16)
    batch_size: int = 32

    def validate(self) -> None:
        """Raise EvaluateError for a shift or extension below 1."""
        for name in ("left_extend", "right_shift"):
            if any(k < 1 for k in getattr(self, name)):
                raise EvaluateError(f"{name} values must be at least 1, got {getattr(self, name)}")
        if self.batch_size < 1:
            raise EvaluateError(f"batch_size must be at least 1, got {self.batch_size}")


@dataclass(frozen=True)
class StressResult:
    """The score of one perturbation.

    Attributes:
        perturbation: "original", "left_extend" or "right_shift".
        k: the extension or shift in tokens (0 for original).
        n: windows scored.
        skipped: windows too short for this perturbation.
        mean_prefix_match: mean longest exact-match prefix, in tokens.
        mean_prefix_fraction: mean of that length / |target|.
        exact: share of continuations equal to the target.
    """

    perturbation: str
    k: int
    n: int
    skipped: int
    mean_prefix_match: float | None
    mean_prefix_fraction: float | None
    exact: float | None

    @property
    def key(self) -> str:
        """A name for result tables: "original", "left_extend_16", "right_shift_8"."""
        return self.perturbation if self.perturbation == "original" else f"{self.perturbation}_{self.k}"

    def summary(self) -> dict[str, float | int | None]:
        """The result as a JSON-ready dict (without the name)."""
        row = asdict(self)
        del row["perturbation"], row["k"]
        return row


def left_extended(windows: Sequence[Window], k: int, filler_ids: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Prompts with k filler tokens prepended, and their targets (the suffixes).

    Window i takes the k filler tokens starting at offset i*k of `filler_ids`, wrapping
    around, so different windows get different filler where the filler is long enough.

    Args:
        windows: memorized windows.
        k: tokens to prepend (>= 1).
        filler_ids: unrelated token ids (e.g. held-out text).

    Returns:
        (prompt, target) per window.

    Raises:
        EvaluateError: k < 1 or an empty filler.
    """
    if k < 1:
        raise EvaluateError(f"the left extension must be at least 1 token, got {k}")
    if not filler_ids:
        raise EvaluateError("left extension needs filler tokens (e.g. held-out text)")
    filler = np.asarray(filler_ids)
    positions = (np.arange(len(windows))[:, None] * k + np.arange(k)[None, :]) % len(filler)
    extensions = filler[positions].tolist()
    return [(ext + w.prefix_ids, list(w.suffix_ids)) for ext, w in zip(extensions, windows)]


def right_shifted(windows: Sequence[Window], k: int) -> list[tuple[list[int], list[int]] | None]:
    """Prompts whose window slides k tokens to the right, and the rest of the suffix.

    Args:
        windows: memorized windows.
        k: the shift (>= 1).

    Returns:
        Per window, (prefix[k:] + suffix[:k], suffix[k:]); None when the suffix has k
        tokens or fewer (nothing left to predict).

    Raises:
        EvaluateError: k < 1.
    """
    if k < 1:
        raise EvaluateError(f"the right shift must be at least 1 token, got {k}")
    return [(w.prefix_ids[k:] + w.suffix_ids[:k], w.suffix_ids[k:]) if len(w.suffix_ids) > k else None
            for w in windows]


def score_continuations(
    model: torch.nn.Module,
    cases: Sequence[tuple[list[int], list[int]]],
    *,
    pad_id: int = 0,
    batch_size: int = 32,
) -> list[int]:
    """Longest exact-match prefix of the greedy continuation of each prompt.

    Args:
        model: an HF causal LM.
        cases: (prompt, target) pairs; |target| tokens are decoded per prompt.
        pad_id: padding id.
        batch_size: prompts per decoding batch.

    Returns:
        Per case, the length of the longest common prefix of continuation and target.

    Raises:
        ValueError: a prompt + target longer than the context window.
    """
    by_length: dict[int, list[int]] = {}
    for index, (_, target) in enumerate(cases):
        by_length.setdefault(len(target), []).append(index)
    matches = [0] * len(cases)
    for length, indices in by_length.items():
        generated = greedy_generate(model, [cases[i][0] for i in indices], length, pad_id=pad_id, batch_size=batch_size)
        for i, out in zip(indices, generated):
            matches[i] = longest_prefix_match(out, cases[i][1])
    return matches


def _summarize(name: str, k: int, cases: list[tuple[list[int], list[int]]], matches: list[int],
               skipped: int) -> StressResult:
    if not cases:
        return StressResult(name, k, 0, skipped, None, None, None)
    lengths = np.array([len(target) for _, target in cases])
    matched = np.array(matches)
    return StressResult(name, k, len(cases), skipped, float(matched.mean()), float((matched / lengths).mean()),
                        float((matched == lengths).mean()))


def stress_test(
    model: torch.nn.Module,
    windows: Sequence[Window],
    options: StressOptions | None = None,
    *,
    filler_ids: Sequence[int] = (),
    pad_id: int = 0,
) -> list[StressResult]:
    """Recitation under the perturbations of `options` (definitions in the module docstring).

    Args:
        model: an HF causal LM in eval mode.
        windows: memorized windows.
        options: the extensions and shifts.
        filler_ids: filler for left extension (required when `options.left_extend` is set).
        pad_id: padding id.

    Returns:
        The original first, then one `StressResult` per left extension and per shift.

    Raises:
        EvaluateError: invalid options, no window, or no filler for a left extension.
        ValueError: an extended prompt + suffix longer than the context window.
    """
    options = options or StressOptions()
    options.validate()
    if not windows:
        raise EvaluateError("the stress test needs at least one memorized window")
    longest = max(len(w.prefix_ids) + len(w.suffix_ids) for w in windows)
    for k in options.left_extend:
        check_fits_context(model, longest + k, f"a window left-extended by {k} tokens")
    if options.left_extend and not filler_ids:
        raise EvaluateError("left extension needs filler tokens (e.g. held-out text)")
    plans: list[tuple[str, int, list[tuple[list[int], list[int]]], int]] = [
        ("original", 0, [(list(w.prefix_ids), list(w.suffix_ids)) for w in windows], 0)]
    plans += [("left_extend", k, left_extended(windows, k, filler_ids), 0) for k in options.left_extend]
    for k in options.right_shift:
        shifted = right_shifted(windows, k)
        kept = [case for case in shifted if case is not None]
        plans.append(("right_shift", k, kept, len(shifted) - len(kept)))
    all_cases = [case for _, _, cases, _ in plans for case in cases]
    all_matches = score_continuations(model, all_cases, pad_id=pad_id, batch_size=options.batch_size)
    results, start = [], 0
    for name, k, cases, skipped in plans:
        results.append(_summarize(name, k, cases, all_matches[start : start + len(cases)], skipped))
        start += len(cases)
    return results
