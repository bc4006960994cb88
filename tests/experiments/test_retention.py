"""Retention against the implanted model, the paper's bands, and the implant's drift (synthetic seeds)."""

from __future__ import annotations

import json

import pytest

from curvedit.experiments.studies.retention import implant_drift, paper_bands, retention_interval, verdict


def seed(number: int, unedited: dict[str, list[int]], kfac: dict[str, list[int]], recall: float = 1.0,
         ppl: tuple[float, float] = (20.0, 20.4)) -> dict:
    def variant(items: dict[str, list[int]]) -> dict:
        return {"probe_items": items, "probes": {f: sum(v) / len(v) for f, v in items.items()}}

    return {"seed": number, "variants": {"unedited": variant(unedited), "kfac": variant(kfac)},
            "implant": {"recall": recall, "perplexity_before": ppl[0], "perplexity_after": ppl[1]}}


def test_retention_pools_items_over_seeds_and_families():
    seeds = [seed(0, {"a": [1, 1, 0, 1], "b": [1, 0]}, {"a": [1, 0, 0, 1], "b": [1, 1]}),
             seed(1, {"a": [1, 1, 1, 1], "b": [0, 0]}, {"a": [1, 1, 0, 0], "b": [0, 1]})]
    pooled = retention_interval(seeds, "kfac", ["a", "b"])
    assert pooled["value"] == pytest.approx((2 + 2 + 2 + 1) / (3 + 1 + 4 + 0))  # accuracy over accuracy
    assert pooled["n"] == 12 and pooled["low"] <= pooled["value"] <= pooled["high"]
    assert retention_interval(seeds, "kfac", ["a"])["value"] == pytest.approx(4 / 7)
    assert retention_interval(seeds, "svd", ["a"]) is None  # not measured
    nothing = [seed(0, {"a": [0, 0]}, {"a": [1, 0]})]
    assert retention_interval(nothing, "kfac", ["a"]) is None  # nothing to retain


def test_a_band_holds_when_its_interval_meets_the_paper_range():
    assert verdict({"low": 0.5, "high": 0.7}, (0.66, 0.74)) == "holds"
    assert verdict({"low": 0.2, "high": 0.6}, (0.66, 0.74)) == "below"
    assert verdict({"low": 0.9, "high": 1.0}, (0.66, 0.74)) == "above"


def test_paper_bands_group_common_and_rare_facts_into_closed_book():
    items = {"facts_common": [1] * 10, "facts_rare": [1] * 10, "add_1d": [1] * 10}
    kept = {"facts_common": [1] * 10, "facts_rare": [1] * 6 + [0] * 4, "add_1d": [0] * 10}
    bands = paper_bands([seed(0, items, kept)], "kfac", list(items),
                        {"facts_common": "closed-book common", "facts_rare": "closed-book rare",
                         "add_1d": "arithmetic"})
    assert set(bands) == {"closed-book", "arithmetic"}
    assert bands["closed-book"]["retention"]["value"] == pytest.approx(16 / 20)
    assert bands["closed-book"]["families"] == ["facts_common", "facts_rare"]
    assert bands["arithmetic"]["verdict"] == "below" and bands["closed-book"]["paper"] == [0.74, 0.86]


def test_implant_drift_allows_five_points_or_the_base_interval_and_ppl_within_3_percent():
    base = {"a": {"accuracy": 0.80, "ci": [0.70, 0.87]}, "b": {"accuracy": 0.50, "ci": [0.40, 0.60]}}
    seeds = [seed(0, {"a": [1] * 72 + [0] * 28, "b": [1] * 44 + [0] * 56}, {}, ppl=(20.0, 20.4)),
             seed(1, {"a": [1] * 60 + [0] * 40, "b": [1] * 50 + [0] * 50}, {}, ppl=(20.0, 19.0))]
    first, second = implant_drift(seeds, base, ["a", "b"])
    assert first["families"]["a"]["drift_points"] == pytest.approx(-8.0)
    assert first["families"]["a"]["ok"] and first["families"]["b"]["ok"]  # -8 is inside a's interval
    assert not second["families"]["a"]["ok"] and second["families"]["b"]["ok"]  # -20: outside both
    assert first["ppl_ok"] and not second["ppl_ok"]  # 1.02x; 0.95x is a drift too


def test_the_report_states_the_bands_the_drift_and_the_choice():
    from curvedit.experiments.studies.report import bands_table, choice_section, implant_table

    items = {"facts_common": [1] * 10, "facts_rare": [1] * 10, "add_1d": [1] * 10}
    kept = {"facts_common": [1] * 9 + [0], "facts_rare": [1] * 5 + [0] * 5, "add_1d": [1] * 7 + [0] * 3}
    s = seed(0, items, kept)
    s["variants"]["paper_placement"] = s["variants"]["kfac"]
    bands = {"facts_common": "closed-book common", "facts_rare": "closed-book rare", "add_1d": "arithmetic"}
    base = {f: {"accuracy": 1.0, "correct": 10, "n": 10, "ci": [0.7, 1.0], "band": b} for f, b in bands.items()}
    s["sweep"] = {"chosen": {"layers": "10-19", "matrices": "mlp", "amount": 0.8, "perplexity": 21.0},
                  "baseline": {"perplexity": 20.0}, "floor": {"facts_common": 0.7}, "floor_met": False,
                  "points": [{"label": "layers 0-29 mlp keep_fraction=0.5", "excluded": "facts_common kept 10% < 70%"},
                             {"label": "other", "excluded": ""}]}
    results = {"seeds": [s], "base_probes": base, "summary": {
        "variants": {name: {"retention_ci": {f: retention_interval([s], name, [f]) for f in items}}
                     for name in ("kfac", "paper_placement")},
        "paper_bands": {name: paper_bands([s], name, list(items), bands) for name in ("kfac", "paper_placement")},
        "implant_drift": implant_drift([s], base, list(items))}}
    text = "\n".join(bands_table(results))
    assert "| closed-book | facts_common, facts_rare | 74-86% |" in text and "**holds**" in text  # 14/20 = 70%
    assert "rare facts fall further than common ones, as in the paper" in text
    drift = implant_table(results)
    assert "held-out perplexity / base" in drift and "1.020x" in drift
    choice = "\n".join(choice_section(results))
    assert "no point kept it" in choice and "facts_common kept 10% < 70%" in choice and "| other |" not in choice


def test_the_report_sets_the_layer_map_against_the_sweep_s_probe_floor():
    from curvedit.experiments.studies.report import map_versus_sweep

    def block(b: int, facts: float) -> dict:
        return {"layers": str(b), "size": 1, "per_ppl": float(b), "per_nats": 2.0 * b,
                "probes": {"facts_common": facts, "cloze": 0.5}}

    lm = {"options": {"matrices": "mlp-in"}, "unedited": {"probes": {"facts_common": 0.8, "cloze": 0.5}},
          "placements": [block(0, 0.4), block(1, 0.6), block(2, 0.8), block(3, 0.7)]}
    def sweep_of(*why: str) -> dict:  # labels sort otherwise than the points run, as in a sorted-key results.json
        points = [{"label": label, "layers": lay, "matrices": m, "excluded": w} for (label, lay, m), w in zip(
            (("z 0-1", "0-1", "mlp-in"), ("b 2-3", "2-3", "mlp-in"), ("a 0-3", "0-3", "mlp")), why)]
        return json.loads(json.dumps({"floor": {"facts_common": 0.7}, "points": points}, sort_keys=True))

    sweep = sweep_of("facts_common kept 10% < 70%", "", "perplexity 1.2x > 1.05x")
    line, table = map_versus_sweep({"seed": 3, "layer_map": lm, "sweep": sweep})
    assert "Ranked by the map's probe cost: 2-3, 0-1" in line  # 0-1 loses 30 points per block, 2-3 loses 5
    assert "the placements that met it are the map's cheapest" in line
    assert "| 0-1 | 30.0 | 0.50 | 1.00 | no (facts_common kept 10% < 70%) |" in table
    assert "| 2-3 | 5.0 | 2.50 | 5.00 | yes |" in table
    assert "0-3" not in table  # the map measured mlp-in only
    sweep = sweep_of("", "facts_common kept 10% < 70%", "")
    assert "the map's cheapest placements are not the ones that met it" in map_versus_sweep(
        {"seed": 3, "layer_map": lm, "sweep": sweep})[0]
    assert map_versus_sweep({"seed": 3, "layer_map": None, "sweep": sweep}) == []


def test_the_report_sets_each_protected_edit_beside_the_unprotected_one_at_each_operating_point():
    from curvedit.experiments.studies.report import protection_section

    ci = {"value": 0.5, "low": 0.4, "high": 0.6, "n": 10, "method": "wilson"}
    names = ["kfac", "kfac_protect_arithmetic", "kfac_protect_arithmetic_matched", "kfac_strict",
             "kfac_protect_arithmetic_strict"]
    variants = {n: {"intervals": {k: ci for k in ("heldout_strict", "heldout_loose", "ppl_ratio")}} for n in names}
    keep = {"kfac": 0.6, "kfac_protect_arithmetic": 0.6, "kfac_protect_arithmetic_matched": 0.5, "kfac_strict": 0.7,
            "kfac_protect_arithmetic_strict": 0.4}
    seeds = [{"variants": {n: {"plan": {"rules": [{"keep_fraction": keep[n] + d}]}} for n in names}}
             for d in (0.0, 0.1)]
    bands = {n: {"arithmetic": {"retention": ci}} for n in names}
    parts = protection_section({"seeds": seeds, "summary": {"variants": variants, "paper_bands": bands}})
    titles = [p for p in parts if p.startswith("Protection")]
    assert titles == ["Protection at the chosen K-FAC amount:", "Protection at K-FAC's tune-half loose recall:",
                      "Protection at the least edit with tune-half strict recall <= the bound:"]
    amount, matched, strict = (parts[i + 1] for i in range(0, 6, 2))
    assert "| K-FAC | 0.650 |" in amount and "| K-FAC, arithmetic protected | 0.650 |" in amount
    assert "tune removal" not in amount and "tune strict" not in amount  # each point's own variants only
    assert "| K-FAC, arithmetic protected, K-FAC's tune removal | 0.550 |" in matched
    assert "| K-FAC, least edit with tune strict <= bound | 0.750 |" in strict and "| - |" in strict  # no closed-book
