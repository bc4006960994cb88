"""Stress test: does recitation survive positional perturbations of the prompt?

Two tests live here (docs/method.md section 6).

**The reference test** (`reference_stress_test`, the default of `curvedit evaluate`), as the
paper's authors define it in their `position_perturb_eval`: for a window with prefix
x_1..x_n and suffix s_1..s_k, the perturbed prompts are the union of

- the prefix extended into the suffix, x_1..x_n s_1..s_i for i = 0..min(t, k) (target:
  the rest of the suffix, s_{i+1}..s_k), and
- left-truncated prefixes x_{n-m+1}..x_n for every length m = t+1..n (target: the whole
  suffix),

with t = 20 by default and the unperturbed prompt (i = 0, m = n) excluded by default. Each
prompt is scored by the longest exact-match prefix of its greedy continuation against its
target; a window's stress score is the maximum over its prompts. Reported: the mean stress
score, the share of windows whose score reaches the whole suffix (k tokens), the
unperturbed score and the share of windows a perturbation recites further than the
original prompt did.

The greedy continuation of a prompt agrees with its target for exactly as many tokens as
the teacher-forced arg-max predictions of prompt + target agree with the target from the
start (each greedy step sees the same context as teacher forcing until the first
disagreement). So every extension into the suffix is read off one forward pass over the
whole window, and each truncated prefix costs one forward pass: no decoding.

**The filler test** (`stress_test`, `curvedit evaluate --stress filler`):

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

import itertools
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch

from curvedit.distributed import map_batches
from curvedit.errors import EvaluateError
from curvedit.evaluate.generation import check_fits_context, greedy_generate
from curvedit.evaluate.intervals import bootstrap_mean, wilson
from curvedit.evaluate.memorization import longest_prefix_match, teacher_forced_match
from curvedit.evaluate.windows import Window


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


@dataclass(frozen=True)
class ReferenceStressOptions:
    """Settings of `reference_stress_test`.

    Attributes:
        t: the reference's t: extensions into the suffix up to t tokens, truncated
            prefixes from t + 1 tokens up.
        include_original: keep the unperturbed prompt in each window's maximum (the
            reference excludes it by default).
        batch_size: sequences per forward pass.
    """

    t: int = 20
    include_original: bool = False
    batch_size: int = 32

    def validate(self) -> None:
        """Raise EvaluateError for t below 1 or batch_size below 1."""
        if self.t < 1:
            raise EvaluateError(f"the stress test's t must be at least 1, got {self.t}")
        if self.batch_size < 1:
            raise EvaluateError(f"batch_size must be at least 1, got {self.batch_size}")


def reference_variants(prefix_len: int, suffix_len: int, t: int, include_original: bool) -> list[tuple[int, int]]:
    """The perturbed prompts of one window, as (start, extension) pairs.

    The prompt is prefix[start:] + suffix[:extension] and its target suffix[extension:]:
    extensions 0..min(t, k) with start 0, then truncations to m = t+1..n-1 tokens
    (start n - m); the full prefix (0, 0) appears once, and only with `include_original`.

    Args:
        prefix_len: n.
        suffix_len: k.
        t: the reference's t.
        include_original: keep (0, 0).

    Returns:
        The (start, extension) pairs, extensions first.
    """
    first = 0 if include_original else 1
    extended = [(0, i) for i in range(first, min(t, suffix_len) + 1)]
    truncated = [(prefix_len - m, 0) for m in range(t + 1, prefix_len)]
    return extended + truncated


def match_runs(match_bs: torch.Tensor) -> torch.Tensor:
    """Per row and position j, how many consecutive matches start at j.

    Args:
        match_bs: bool (B, S), whether each position's prediction is right.

    Returns:
        long (B, S + 1): `runs[b, j]` is the length of the run of True starting at j
        (`runs[b, S] = 0`); `runs[:, j]` is the exact-match prefix length of a continuation
        scored against the target from position j on.
    """
    batch, width = match_bs.shape
    positions = torch.arange(width + 1, device=match_bs.device).expand(batch, width + 1)
    padded = torch.cat([match_bs, match_bs.new_zeros(batch, 1)], dim=1)
    first_miss = torch.where(padded, width, positions)
    next_miss = first_miss.flip(1).cummin(dim=1).values.flip(1)
    return next_miss - positions


@dataclass(frozen=True)
class ReferenceStressResult:
    """The reference stress test over a set of windows.

    Attributes:
        t: the t used.
        include_original: whether the unperturbed prompt counted in the maximum.
        prompts: perturbed prompts scored (over all windows).
        stress: per window, the maximum exact-match prefix over its perturbed prompts.
        original: per window, the exact-match prefix of the unperturbed prompt.
        suffix_lengths: per window, k.
    """

    t: int
    include_original: bool
    prompts: int
    stress: list[int]
    original: list[int]
    suffix_lengths: list[int]

    def summary(self) -> dict[str, Any]:
        """Means (with bootstrap intervals) and shares (with Wilson intervals), JSON-ready."""
        stress, original = np.array(self.stress), np.array(self.original)
        full = int((stress >= np.array(self.suffix_lengths)).sum())
        improved = int((stress > original).sum())
        n = len(self.stress)
        return {
            "n": n, "t": self.t, "include_original": self.include_original, "prompts": self.prompts,
            "mean_stress": float(stress.mean()), "mean_stress_ci": bootstrap_mean(stress.tolist()).to_dict(),
            "full_match": full / n, "full_match_ci": wilson(full, n).to_dict(),
            "mean_original": float(original.mean()), "improved": improved / n,
            "improved_ci": wilson(improved, n).to_dict(),
        }


def reference_stress_test(
    model: torch.nn.Module,
    windows: Sequence[Window],
    options: ReferenceStressOptions | None = None,
    *,
    pad_id: int = 0,
) -> ReferenceStressResult:
    """The authors' position-perturbation stress test (module docstring), by teacher forcing.

    Args:
        model: an HF causal LM in eval mode.
        windows: memorized windows.
        options: t, whether the unperturbed prompt counts, batch size.
        pad_id: padding id.

    Returns:
        A `ReferenceStressResult`.

    Raises:
        EvaluateError: invalid options, no window, or a window longer than the context.
    """
    options = options or ReferenceStressOptions()
    options.validate()
    if not windows:
        raise EvaluateError("the stress test needs at least one memorized window")
    check_fits_context(model, max(len(w.prefix_ids) + len(w.suffix_ids) for w in windows), "a memorized window")
    # case 0 of each window is the whole window (original and every extension); then its truncations
    cases: list[tuple[int, int]] = []  # (window index, start)
    variants: list[list[tuple[int, int]]] = []
    for index, w in enumerate(windows):
        variants.append(reference_variants(len(w.prefix_ids), len(w.suffix_ids), options.t, options.include_original))
        cases.append((index, 0))
        cases += [(index, start) for start, extension in variants[-1] if start > 0]
    order = sorted(range(len(cases)), key=lambda c: (len(windows[cases[c][0]].suffix_ids),
                                                     len(windows[cases[c][0]].prefix_ids) - cases[c][1]))

    def score(chunk: list[int]) -> list[torch.Tensor]:
        runs: list[torch.Tensor] = []
        for _, group in itertools.groupby(chunk, key=lambda c: len(windows[cases[c][0]].suffix_ids)):
            chosen = [Window(prefix_ids=windows[i].prefix_ids[start:], suffix_ids=windows[i].suffix_ids)
                      for i, start in (cases[c] for c in group)]  # teacher forcing takes one suffix length a call
            runs += list(match_runs(teacher_forced_match(model, chosen, pad_id=pad_id)).cpu())
        return runs

    runs_by_case = dict(zip(order, map_batches(order, options.batch_size, score)))
    stress, original = [0] * len(windows), [0] * len(windows)
    for c, (index, start) in enumerate(cases):
        runs = runs_by_case[c]
        if start == 0:
            original[index] = int(runs[0])
            extensions = [e for s, e in variants[index] if s == 0]
            best = int(runs[extensions].max()) if extensions else 0
        else:
            best = int(runs[0])
        stress[index] = max(stress[index], best)
    return ReferenceStressResult(t=options.t, include_original=options.include_original,
                                 prompts=sum(len(v) for v in variants), stress=stress, original=original,
                                 suffix_lengths=[len(w.suffix_ids) for w in windows])
