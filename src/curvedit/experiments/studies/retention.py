"""What an edit keeps: retention of capability families, pooled over seeds with intervals,
set against the paper's bands, and the implant's own drift from the base model.

Retention of a group of families (one family, or every usable family in a band) is the
variant's correct items over the implanted model's correct items on the same items, pooled
over seeds and families; its 95% interval is a paired percentile bootstrap over the items
(`curvedit.evaluate.intervals.bootstrap_ratio`: each item keeps its two outcomes together).

The paper's bands (Merullo et al. 2025, K-FAC edit on OLMo-2, share of the unedited score):
logic 95-106%, open-book QA 93-99%, closed-book QA 74-86% (rare facts fall, common ones such
as country capitals hold), arithmetic 66-74%. A band "holds" on a model when the interval of
its retention meets the paper's range; otherwise it is below or above it. Cloze and
copying have no paper figure and are reported without a verdict.
"""

from __future__ import annotations

from typing import Any, Sequence

from curvedit.evaluate.intervals import bootstrap_ratio

PAPER_BANDS: dict[str, tuple[float, float]] = {"logic": (0.95, 1.06), "open-book QA": (0.93, 0.99),
                                               "closed-book": (0.74, 0.86), "arithmetic": (0.66, 0.74)}
# the suite's bands (`curvedit.evaluate.capabilities.BANDS`) -> the paper's
PAPER_BAND_OF = {"logic": "logic", "open-book QA": "open-book QA", "closed-book common": "closed-book",
                 "closed-book rare": "closed-book", "arithmetic": "arithmetic"}
IMPLANT_DRIFT_POINTS = 5.0  # the bound on a usable family's drift from the base model
IMPLANT_PPL_RATIO = 1.03  # ... and on held-out perplexity, in either direction


def retention_interval(seeds: Sequence[dict[str, Any]], variant: str, families: Sequence[str]
                       ) -> dict[str, Any] | None:
    """Retention of `families` under `variant` against the implanted (unedited) model, pooled
    over seeds, with its paired bootstrap interval.

    Args:
        seeds: the study's per-seed results (each variant with `probe_items`: family -> 0/1
            per item).
        variant: the variant's name.
        families: the families pooled.

    Returns:
        The interval as a dict (value, low, high, n items), or None when the implanted model
        gets none of these items right (nothing to retain) or the variant was not measured.
    """
    kept, had = [], []
    for seed in seeds:
        edited, unedited = seed["variants"].get(variant), seed["variants"]["unedited"]
        if edited is None or "probe_items" not in edited:
            return None
        for family in families:
            kept += edited["probe_items"][family]
            had += unedited["probe_items"][family]
    if not sum(had):
        return None
    return bootstrap_ratio(kept, had).to_dict()


def verdict(interval: dict[str, Any], band: tuple[float, float]) -> str:
    """"holds" when the interval meets the paper's range, else "below" or "above" it."""
    low, high = band
    if interval["high"] < low:
        return "below"
    if interval["low"] > high:
        return "above"
    return "holds"


def paper_bands(seeds: Sequence[dict[str, Any]], variant: str, families: Sequence[str],
                band_of: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per paper band with a measured family: the variant's pooled retention, the paper's
    range and the verdict.

    Args:
        seeds: per-seed results.
        variant: the variant judged (the K-FAC edit, or the paper's placement).
        families: the families used for retention.
        band_of: family -> the suite's band.
    """
    out: dict[str, dict[str, Any]] = {}
    for band, paper in PAPER_BANDS.items():
        members = [f for f in families if PAPER_BAND_OF.get(band_of[f]) == band]
        interval = retention_interval(seeds, variant, members) if members else None
        if interval is not None:
            out[band] = {"families": members, "retention": interval, "paper": list(paper),
                         "verdict": verdict(interval, paper)}
    return out


def implant_drift(seeds: Sequence[dict[str, Any]], base_probes: dict[str, dict[str, Any]],
                  families: Sequence[str]) -> list[dict[str, Any]]:
    """Per seed: each usable family's accuracy on the base and the implanted model, the drift
    in points, and whether it is within `IMPLANT_DRIFT_POINTS` or inside the base model's 95%
    interval; the held-out perplexity ratio (implanted / base) and whether it is within
    `IMPLANT_PPL_RATIO` either way; and the share of canaries recited."""
    rows = []
    for seed in seeds:
        implanted = seed["variants"]["unedited"]["probes"]
        per_family = {}
        for family in families:
            base = base_probes[family]
            drift = 100 * (implanted[family] - base["accuracy"])
            inside = base["ci"][0] <= implanted[family] <= base["ci"][1]
            per_family[family] = {"base": base["accuracy"], "implanted": implanted[family], "drift_points": drift,
                                  "ok": abs(drift) <= IMPLANT_DRIFT_POINTS or inside}
        result = seed["implant"]
        ratio = result["perplexity_after"] / result["perplexity_before"]
        rows.append({"seed": seed["seed"], "families": per_family, "ppl_ratio": ratio,
                     "ppl_ok": 1 / IMPLANT_PPL_RATIO <= ratio <= IMPLANT_PPL_RATIO, "recall": result["recall"]})
    return rows
