"""What the study measures on a model, edited or not: recitation of the held-out canaries,
perplexity, nDCG@10 against the unedited model, the capability suite, the stress test,
extraction and membership inference; and the band analysis on the chosen targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from curvedit.data import default_pad_id
from curvedit.diagnostics.analysis import BandOptions, band_analysis
from curvedit.editing.edit import apply_edit
from curvedit.evaluate.memorization import evaluate_recitation
from curvedit.evaluate.perplexity import ndcg_at_k, perplexity
from curvedit.evaluate.privacy import extraction_metrics, membership_scores, sequence_stats
from curvedit.evaluate.stress import StressOptions, reference_stress_test, stress_test
from curvedit.evaluate.tasks import TaskOptions, run_tasks
from curvedit.evaluate.windows import Window
from curvedit.experiments.studies.canary_stage import style_of
from curvedit.experiments.studies.options import StudyOptions


@dataclass
class SeedProbe:
    """What one seed's variants are measured on.

    Attributes:
        tune, heldout: the recited canaries' halves.
        text: all held-out general text (perplexity).
        ppl_text: its first sequences (nDCG, the sweep's perplexity).
        tasks: the probe tasks.
        filler: filler tokens of the filler stress test.
        nonmembers: canaries generated like the implanted ones but never trained on, as long
            as the canary windows (membership inference).
        texts: the text of every held-out canary window and non-member (zlib entropy).
        reference_losses: the base (pre-implant) model's loss on the held-out canaries and
            on the non-members (the `reference` MIA score).
    """

    tune: list[Window]
    heldout: list[Window]
    text: list[list[int]]
    ppl_text: list[list[int]]
    tasks: list[Any]
    filler: list[int]
    nonmembers: list[list[int]]
    texts: dict[str, list[str]]
    reference_losses: dict[str, list[float]]


SAMPLES, TEMPERATURE = 100, 1.0  # sampled extraction: at least one of 100 samples at temperature 1


def measure(model: torch.nn.Module, tokenizer: Any, probe: SeedProbe, reference: Any,
            options: StudyOptions) -> dict[str, Any]:
    """One variant's numbers.

    Returns:
        `heldout` and `tune` recitation (strict, loose, distance, per window;
        `heldout_by_style` per canary style), `perplexity` (all held-out text, with its
        per-sequence NLL), `ndcg10` (rank gain, the paper's) and `ndcg10_probability`
        against the unedited model's rankings `reference`, with per-sequence sums,
        `probes` (accuracy per family), `stress_reference` (the paper's position
        perturbations, per window), `stress` (the filler test, per perturbation),
        `extraction` (exact memorization, extraction strength, sampled extraction, per
        window) and `mia` (every membership score of the held-out canaries and the non-members).
    """
    pad_id = default_pad_id(tokenizer)
    bs = options.batch_size

    def recitation(windows: Sequence[Window]) -> dict[str, Any]:
        result, _ = evaluate_recitation(model, windows, pad_id=pad_id, batch_size=bs)
        return {"n": result.n, "strict": result.strict, "loose": result.loose,
                "distance": result.avg_normalized_distance,
                "per_window": [{"style": style_of(w), "strict": s.strict, "loose": s.loose,
                                "distance": s.normalized_distance} for w, s in zip(windows, result.examples)]}

    heldout = recitation(probe.heldout)
    probe_results = run_tasks(model, tokenizer, probe.tasks, TaskOptions(batch_size=bs), pad_id=pad_id)
    by_style = {}
    for style in sorted({row["style"] for row in heldout["per_window"]}):
        rows = [row for row in heldout["per_window"] if row["style"] == style]
        by_style[style] = {"n": len(rows), **{k: sum(r[k] for r in rows) / len(rows)
                                              for k in ("strict", "loose", "distance")}}
    stress = stress_test(model, probe.heldout, StressOptions(left_extend=(16,), right_shift=(8, 16), batch_size=bs),
                         filler_ids=probe.filler, pad_id=pad_id)
    reference_stress = reference_stress_test(model, probe.heldout, pad_id=pad_id)
    ppl = perplexity(model, probe.text, pad_id=pad_id, batch_size=bs)
    ndcg = {gain: ndcg_at_k(model, probe.ppl_text, reference, pad_id=pad_id, batch_size=bs, gain=gain)
            for gain in ("rank", "probability")}
    members = [w.prefix_ids + w.suffix_ids for w in probe.heldout]
    member_stats = sequence_stats(model, members, pad_id=pad_id, batch_size=bs, temperature=TEMPERATURE)
    nonmember_stats = sequence_stats(model, probe.nonmembers, pad_id=pad_id, batch_size=bs)
    mia = {group: {name: values.tolist() for name, values in membership_scores(
        stats, probe.texts[group], reference_losses=probe.reference_losses[group]).items()}
        for group, stats in (("members", member_stats), ("nonmembers", nonmember_stats))}
    return {
        "heldout": heldout, "heldout_by_style": by_style, "tune": recitation(probe.tune),
        "perplexity": ppl.perplexity, "sequence_nll": list(ppl.sequence_nll),
        "sequence_tokens": list(ppl.sequence_tokens),
        "ndcg10": ndcg["rank"].ndcg, "ndcg10_probability": ndcg["probability"].ndcg,
        "ndcg10_sums": {gain: list(r.sequence_sums) for gain, r in ndcg.items()},
        "ndcg10_positions": list(ndcg["rank"].sequence_positions),
        "probes": {r.name: r.accuracy for r in probe_results},
        "probe_items": {r.name: [int(d["correct"]) for d in r.details] for r in probe_results},
        "stress": {r.key: {"mean_prefix_match": r.mean_prefix_match, "exact": r.exact} for r in stress},
        "stress_reference": {k: v for k, v in reference_stress.summary().items() if not k.endswith("_ci")}
        | {"per_window": reference_stress.stress, "suffix_lengths": reference_stress.suffix_lengths},
        "extraction": extraction_metrics(member_stats, [len(w.suffix_ids) for w in probe.heldout], SAMPLES),
        "mia": mia,
    }


def edit_and_measure(model, tokenizer, targets, bases, plan, probe, reference, options,
                     apply: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Apply `plan` in memory (or call `apply`, which returns what undoes its own edit, such as a
    coherent step), measure the variant (`measure`), and undo the edit."""
    applied = apply() if apply is not None else apply_edit(targets, plan, bases)
    try:
        metrics = measure(model, tokenizer, probe, reference, options)
    finally:
        applied.undo()
    metrics["kept_components"] = sum(s.kept for s in applied.stats)
    metrics["total_components"] = sum(s.total for s in applied.stats)
    metrics["plan"] = plan.to_dict()
    return metrics


def perplexity_after(model, targets, bases, plan, sequences, pad_id: int, batch_size: int) -> float:
    """Held-out perplexity with `plan` applied (then undone)."""
    applied = apply_edit(targets, plan, bases)
    try:
        return perplexity(model, sequences, pad_id=pad_id, batch_size=batch_size).perplexity
    finally:
        applied.undo()


def run_band_analysis(model, targets, bases, windows: Sequence[Window], text: Sequence[Sequence[int]], out: Path,
                      pad_id: int) -> None:
    """Figure 2 on the chosen targets: mean |projection| per curvature band, canaries vs text."""
    band_analysis(model, targets, bases, windows, list(text[:64]), BandOptions(batch_size=16, progress=False),
                  pad_id=pad_id).write(out / "analysis")
