"""The study's results pooled over seeds: intervals per variant, retention of the usable
capability families, and the issue's targets checked per seed.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from curvedit.diagnostics.flat_energy import score_separation
from curvedit.editing.budget import BudgetSearch, BudgetStep
from curvedit.evaluate.intervals import Interval, bootstrap_mean, bootstrap_ratio, wilson
from curvedit.evaluate.privacy import MIA_SCORES, stratified_auroc_interval
from curvedit.experiments.studies.options import StudyOptions
from curvedit.experiments.studies.retention import (
    IMPLANT_DRIFT_POINTS,
    IMPLANT_PPL_RATIO,
    implant_drift,
    paper_bands,
    retention_interval,
)

VARIANTS = ("unedited", "kfac", "random_count", "random_ppl", "svd", "bsn", "paper_placement")


def _matched(variant: dict[str, Any]) -> bool:
    """Whether a perplexity-matched control landed within 10% of K-FAC's perplexity rise
    (`curvedit.editing.budget.BudgetSearch.matches`; a control that cannot be matched is no
    comparison at equal cost)."""
    search = dict(variant["matched"])
    search.pop("ppl_ratio", None)
    search["steps"] = [BudgetStep(**step) for step in search["steps"]]
    return BudgetSearch(**search).matches()


def pooled_intervals(pairs: Sequence[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """95% intervals of one variant pooled over seeds, from (variant, unedited) per seed.

    Rates (held-out strict / loose, the stress test's full matches) get Wilson intervals
    over every held-out canary of every seed; means (distance, stress score, exact
    memorization, extraction strength, sampled extraction) bootstrap intervals over the
    same canaries; the perplexity ratio to unedited a paired bootstrap over (seed,
    held-out sequence) units (`exp(sum(NLL - NLL_unedited) / sum(tokens))`); nDCG@10 a
    bootstrap over (seed, sequence); each MIA AUROC a bootstrap stratified by seed
    (members are compared with non-members of their own seed only).
    """
    windows = [w for v, _ in pairs for w in v["heldout"]["per_window"]]
    stress = [(score, k) for v, _ in pairs
              for score, k in zip(v["stress_reference"]["per_window"], v["stress_reference"]["suffix_lengths"])]
    nll = [a - b for v, u in pairs for a, b in zip(v["sequence_nll"], u["sequence_nll"])]
    per_token = bootstrap_ratio(nll, [t for v, _ in pairs for t in v["sequence_tokens"]])
    intervals: dict[str, Interval] = {
        "heldout_strict": wilson(sum(w["strict"] for w in windows), len(windows)),
        "heldout_loose": wilson(sum(w["loose"] for w in windows), len(windows)),
        "heldout_distance": bootstrap_mean([w["distance"] for w in windows]),
        "ppl_ratio": Interval(math.exp(per_token.value), math.exp(per_token.low), math.exp(per_token.high),
                              per_token.n, per_token.method),
        "ndcg10": bootstrap_ratio([x for v, _ in pairs for x in v["ndcg10_sums"]["rank"]],
                                  [n for v, _ in pairs for n in v["ndcg10_positions"]]),
        "stress_mean": bootstrap_mean([score for score, _ in stress]),
        "stress_full": wilson(sum(score >= k for score, k in stress), len(stress)),
    }
    for name in ("exact_memorization", "extraction_strength", "sampled_extraction"):
        intervals[name] = bootstrap_mean([x for v, _ in pairs for x in v["extraction"]["per_window"][name]])
    for name in MIA_SCORES:
        intervals[f"mia_{name}"] = stratified_auroc_interval(
            [(v["mia"]["members"][name], v["mia"]["nonmembers"][name]) for v, _ in pairs])
    return {name: interval.to_dict() for name, interval in intervals.items()}


def _mean_present(values: Sequence[float | None]) -> float | None:
    """The mean of the values that exist (a seed without held-out windows of a style has none)."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def usable_families(base_probe: dict[str, dict[str, Any]]) -> list[str]:
    """The families the base model gets clearly above chance, in suite order."""
    return [f for f, score in base_probe.items() if score["usable"]]


def flat_score(seeds: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The flat-energy share as a label-free memorization score (`curvedit.diagnostics.flat_energy`):
    AUROC of the recited canaries against never-implanted ones, stratified by seed with its
    bootstrap interval, and the share of non-members a screen keeping 99% of the members
    would skip (mean over seeds). None when a seed lacks the non-members' shares."""
    strata = []
    for seed in seeds:
        energy = seed.get("style_energy") or {}
        if "nonmember" not in energy:
            return None
        members = [x for group, v in energy.items() if group not in ("flat_fraction", "general", "nonmember")
                   for x in v["per_window"]]
        strata.append((members, energy["nonmember"]["per_window"]))
    return score_separation(strata) | {"members": sum(len(m) for m, _ in strata),
                                       "nonmembers": sum(len(n) for _, n in strata)}


def summarize(seeds: list[dict[str, Any]], base_probe: dict[str, dict[str, Any]], options: StudyOptions
              ) -> dict[str, Any]:
    """Means over seeds per variant, retention of the usable families (against the implanted
    model and against the base model; pooled with intervals per family, and per paper band
    for K-FAC and the paper's placement: `curvedit.experiments.studies.retention`), the implant's drift
    from the base model, and the issue's targets checked per seed."""
    used = usable_families(base_probe)
    # retention is measured against the implanted model: families it no longer gets right say nothing
    kept = [f for f in used if all(s["variants"]["unedited"]["probes"].get(f) for s in seeds)]
    table: dict[str, Any] = {}
    for name in dict.fromkeys([*VARIANTS, *(n for s in seeds for n in s["variants"])]):
        if not all(name in s["variants"] for s in seeds):
            continue
        rows = [s["variants"][name] for s in seeds]

        def mean(get: Callable[[dict[str, Any], dict[str, Any]], float], rows: list[Any] = rows) -> float:
            values = [get(r, s["variants"]["unedited"]) for r, s in zip(rows, seeds)]
            return sum(values) / len(values)

        table[name] = {
            "heldout_strict": mean(lambda r, u: r["heldout"]["strict"]),
            "heldout_loose": mean(lambda r, u: r["heldout"]["loose"]),
            "heldout_distance": mean(lambda r, u: r["heldout"]["distance"]),
            "tune_loose": mean(lambda r, u: r["tune"]["loose"]),
            "perplexity": mean(lambda r, u: r["perplexity"]),
            "ppl_ratio": mean(lambda r, u: r["perplexity"] / u["perplexity"]),
            "ndcg10": mean(lambda r, u: r["ndcg10"]),
            "probe_retention": {f: mean(lambda r, u, f=f: r["probes"][f] / u["probes"][f]) for f in kept},
            "probe_retention_base": {f: mean(lambda r, u, f=f: r["probes"][f] / base_probe[f]["accuracy"])
                                     for f in used},
            "stress_exact": {k: mean(lambda r, u, k=k: r["stress"][k]["exact"] or 0.0)
                             for k in rows[0]["stress"]},
            "by_style": {st: {m: _mean_present([r["heldout_by_style"].get(st, {}).get(m) for r in rows])
                              for m in ("strict", "loose")} for st in options.styles},
            "ndcg10_probability": mean(lambda r, u: r["ndcg10_probability"]),
            "intervals": pooled_intervals([(r, s["variants"]["unedited"]) for r, s in zip(rows, seeds)]),
        }
    band_of = {f: base_probe[f]["band"] for f in base_probe}
    for name, row in table.items():
        row["retention_ci"] = {f: retention_interval(seeds, name, [f]) for f in kept}
    bands = {name: paper_bands(seeds, name, kept, band_of) for name in table}
    drift = implant_drift(seeds, base_probe, used)
    checks = []
    for s, d in zip(seeds, drift):
        v = s["variants"]
        kfac, unedited = v["kfac"], v["unedited"]
        checks.append({
            "seed": s["seed"],
            "implant_recall>=0.9": s["implant"]["recall"] >= 0.9,
            f"implant_drift<={IMPLANT_DRIFT_POINTS:g}pts": all(f["ok"] for f in d["families"].values()),
            f"implant_ppl_within_{IMPLANT_PPL_RATIO:g}x": d["ppl_ok"],
            **({"probe_floor_met": bool(s["sweep"]["floor_met"])} if s["sweep"].get("floor") else {}),
            "kfac_strict<=0.05": kfac["heldout"]["strict"] <= 0.05,
            "kfac_loose<=0.10": kfac["heldout"]["loose"] <= 0.10,
            "kfac_ppl<=1.05x": kfac["perplexity"] <= 1.05 * unedited["perplexity"],
            **{f"{name}_matched_within_10%_of_rise": _matched(v[name]) for name in ("random_ppl", "svd")},
            "random_ppl_loose>=2x_kfac": v["random_ppl"]["heldout"]["loose"] >= 2 * kfac["heldout"]["loose"] - 1e-12,
            "svd_loose>=2x_kfac": v["svd"]["heldout"]["loose"] >= 2 * kfac["heldout"]["loose"] - 1e-12,
        })
    return {"variants": table, "probes_used": used, "probes_for_retention": kept, "targets": checks,
            "paper_bands": bands, "implant_drift": drift, "flat_score": flat_score(seeds)}
