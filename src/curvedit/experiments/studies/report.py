"""The SmolLM2 study's report: Markdown tables and figures from its `results.json`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from curvedit.diagnostics.frontier import FrontierResult
from curvedit.evaluate.intervals import Interval, format_interval, wilson
from curvedit.experiments.studies.retention import IMPLANT_DRIFT_POINTS, IMPLANT_PPL_RATIO, PAPER_BANDS
from curvedit.io import display_path
from curvedit.plots import pyplot, save_figure

# every variant's label, in the order the study measures them (and the report shows them)
LABELS = {"unedited": "unedited (implanted)", "kfac": "K-FAC", "random_count": "random, K-FAC's count",
          "random_ppl": "random, matched ppl", "svd": "SVD, matched ppl", "bsn": "BalancedSubnet",
          "kfac_self_factors": "K-FAC, factors on its own samples",
          "kfac_mix_factors": "K-FAC, factors half pydoc half own samples",
          "kfac_pydoc_factors": "K-FAC, factors on pydoc text", "paper_placement": "K-FAC, the paper's placement",
          "step": "coherent step from the tune half, K-FAC's ppl",
          "kfac_strict": "K-FAC, least edit with tune strict <= bound",
          "kfac_protect_arithmetic": "K-FAC, arithmetic protected",
          "kfac_protect_arithmetic_matched": "K-FAC, arithmetic protected, K-FAC's tune removal",
          "kfac_protect_arithmetic_strict": "K-FAC, arithmetic protected, tune strict <= bound",
          "kfac_protect_facts_common": "K-FAC, common facts protected",
          "kfac_protect_facts_common_matched": "K-FAC, common facts protected, K-FAC's tune removal",
          "kfac_protect_facts_common_strict": "K-FAC, common facts protected, tune strict <= bound",
          "kfac_protect_facts_rare": "K-FAC, rare facts protected",
          "kfac_protect_facts_rare_matched": "K-FAC, rare facts protected, K-FAC's tune removal",
          "kfac_protect_facts_rare_strict": "K-FAC, rare facts protected, tune strict <= bound",
          "ekfac": "EK-FAC masses, matched ppl", "targeted": "targeted (forget = tune half), matched ppl"}
COMMAND = "curvedit study smollm2"


def _pct(x: float | None) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f}%"


def _table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def _ci(interval: dict[str, Any], percent: bool = True, digits: int = 3) -> str:
    text = format_interval(interval, percent, digits)
    return text.replace(" [", "% [", 1) if percent else text


def _versus(intervals: dict[str, Any], kfac: dict[str, Any] | None, key: str) -> str:
    """"≈" when the interval overlaps K-FAC's (the difference is not clear), else "clear"."""
    if kfac is None or intervals is kfac:
        return "-"
    return "≈" if Interval(**intervals[key]).overlaps(Interval(**kfac[key])) else "clear"


def main_table(results: dict[str, Any]) -> str:
    """Variant x metrics, pooled over seeds with 95% intervals (probe retention: mean over seeds)."""
    summary = results["summary"]
    used = summary["probes_used"]
    variants = summary["variants"]
    kfac = variants["kfac"]["intervals"] if "kfac" in variants else None
    rows = []
    for name, v in variants.items():
        ci = v["intervals"]
        retention = v["probe_retention"]
        rows.append([LABELS.get(name, name), _ci(ci["heldout_strict"]), _ci(ci["heldout_loose"]),
                     _versus(ci, kfac, "heldout_loose"), _ci(ci["heldout_distance"], percent=False),
                     _ci(ci["ppl_ratio"], percent=False), _ci(ci["ndcg10"], percent=False),
                     _pct(sum(retention.values()) / len(retention)) if retention else "-",
                     _ci(ci["stress_mean"], percent=False, digits=1), _ci(ci["stress_full"])])
    return _table(["variant", "held-out strict", "held-out loose", "loose vs K-FAC", "distance", "ppl / unedited",
                   "nDCG@10 (rank)", f"probe retention ({len(summary.get('probes_for_retention', used))} families)",
                   "stress: max prefix (tokens)", "stress: whole suffix"], rows)


def privacy_table(results: dict[str, Any]) -> str:
    """Extraction metrics and membership-inference AUROCs per variant, pooled over seeds."""
    variants = results["summary"]["variants"]
    kfac = variants["kfac"]["intervals"] if "kfac" in variants else None
    rows = []
    for name, v in variants.items():
        ci = v["intervals"]
        rows.append([LABELS.get(name, name), _ci(ci["exact_memorization"]), _ci(ci["extraction_strength"]),
                     _ci(ci["sampled_extraction"]),
                     *[_ci(ci[f"mia_{score}"], percent=False, digits=2) for score in MIA_COLUMNS],
                     _versus(ci, kfac, "mia_loss")])
    return _table(["variant", "exact memorization", "extraction strength", "sampled extraction (N=100, T=1)",
                   *[f"AUROC {score}" for score in MIA_COLUMNS], "loss AUROC vs K-FAC"], rows)


def definitions_table(results: dict[str, Any]) -> str:
    """The numbers the definition change moved: nDCG gain, and the stress test."""
    variants = results["summary"]["variants"]
    rows = [[LABELS.get(n, n), f"{v['ndcg10_probability']:.3f}", f"{v['ndcg10']:.3f}",
             _pct(v["stress_exact"].get("right_shift_8")), _pct(v["intervals"]["stress_full"]["value"])]
            for n, v in variants.items()]
    return _table(["variant", "nDCG@10, probability gain (before)", "nDCG@10, rank gain (now)",
                   "stress, filler: shift 8 recited whole (before)", "stress, reference: whole suffix (now)"], rows)


MIA_COLUMNS = ("loss", "zlib", "min_k", "min_k_plus_plus", "reference")


def _rates(windows: list[dict[str, Any]]) -> str:
    """`strict / loose` of some held-out canaries, each with its 95% Wilson interval."""
    if not windows:
        return "-"
    return " / ".join(_ci(wilson(sum(w[k] for w in windows), len(windows)).to_dict()) for k in ("strict", "loose"))


def seed_table(results: dict[str, Any]) -> str:
    """Per seed: implant, found canaries, the chosen edit, K-FAC and controls' held-out recall."""
    rows = []
    for s in results["seeds"]:
        v, chosen = s["variants"], s["sweep"]["chosen"]
        imp = s["implant"]
        canaries = len(s["canaries"])
        rows.append([str(s["seed"]), f"{imp['steps']}",
                     _ci(wilson(round(imp["recall"] * canaries), canaries).to_dict()),
                     f"{imp['perplexity_before']:.3f} -> {imp['perplexity_after']:.3f}",
                     f"{s['found']['tune']}+{s['found']['heldout']}",
                     f"layers {chosen['layers']} {chosen['matrices']}, keep {chosen['amount']:.3f}",
                     *[_rates(v[n]["heldout"]["per_window"]) for n in ("unedited", "kfac", "random_ppl", "svd", "bsn")],
                     f"{v['kfac']['perplexity'] / v['unedited']['perplexity']:.3f}x"])
    return _table(["seed", "implant steps", "canaries recited", "ppl base -> implanted", "found (tune+held-out)",
                   "chosen edit", "unedited strict/loose", "K-FAC", "random (ppl)", "SVD (ppl)", "BSN",
                   "K-FAC ppl"], rows)


def style_table(results: dict[str, Any]) -> str:
    """Held-out strict / loose per canary style, pooled over seeds, with 95% Wilson intervals."""
    variants = results["summary"]["variants"]
    styles = list(next(iter(variants.values()))["by_style"])
    rows = [[LABELS.get(n, n), *[_rates([w for s in results["seeds"] for w in s["variants"][n]["heldout"]["per_window"]
                                         if w["style"] == st]) for st in styles]] for n in variants]
    return _table(["variant", *[f"{st} strict / loose" for st in styles]], rows)


def probe_table(results: dict[str, Any]) -> str:
    """Every capability family: its band, the base model's accuracy, chance level and whether it
    is usable, and its accuracy per variant pooled over seeds (95% Wilson intervals)."""
    base = results["base_probes"]
    names = list(results["summary"]["variants"])
    rows = []
    for family, score in sorted(base.items()):
        n = score["n"]
        per = [[s["variants"][v]["probes"].get(family) for s in results["seeds"] if v in s["variants"]]
               for v in names]
        cells = ["-" if not values or None in values else
                 _ci(wilson(round(sum(values) * n), n * len(values)).to_dict()) for values in per]
        rows.append([family, score["band"], _ci(wilson(score["correct"], n).to_dict()), str(n),
                     f"{score['chance']:.0%}", "yes" if score["usable"] else "no", *cells])
    return _table(["family", "band", "base model", "items", "chance", "usable",
                   *[LABELS.get(n, n) for n in names]], rows)


def retention_table(results: dict[str, Any]) -> str:
    """Per usable family: each variant's accuracy as a share of the implanted model's (pooled
    over seeds, paired bootstrap 95% interval; the seed mean where items were not kept) and of
    the base model's (seed mean, after the slash)."""
    summary = results["summary"]
    variants = summary["variants"]
    rows = []
    for family in summary["probes_used"]:
        row = [family, results["base_probes"][family]["band"]]
        for name in variants:
            pooled = variants[name].get("retention_ci", {}).get(family)
            on_implanted = _ci(pooled) if pooled else _pct(variants[name]["probe_retention"].get(family))
            on_base = variants[name].get("probe_retention_base", {}).get(family)
            row.append(f"{on_implanted} / {_pct(on_base)}")
        rows.append(row)
    return _table(["family", "band", *[LABELS.get(n, n) for n in variants]], rows)


def bands_table(results: dict[str, Any]) -> list[str]:
    """The paper's bands against K-FAC (the chosen edit) and the paper's placement: pooled
    retention with its interval, the paper's range and whether the band holds; then rare
    against common facts."""
    bands = results["summary"].get("paper_bands") or {}
    if not any(bands.values()):
        return []
    names = [n for n in ("kfac", "paper_placement") if bands.get(n)]
    rows = []
    for band, (low, high) in PAPER_BANDS.items():
        cells = [(bands[n].get(band)) for n in names]
        if not any(cells):
            continue
        families = next(c["families"] for c in cells if c)
        rows.append([band, ", ".join(families), f"{100 * low:.0f}-{100 * high:.0f}%",
                     *[f"{_ci(c['retention'])} **{c['verdict']}**" if c else "-" for c in cells]])
    parts = [_table(["paper band", "families", "paper", *[LABELS[n] for n in names]], rows)]
    variants = results["summary"]["variants"]
    for name in names:
        common, rare = (variants[name].get("retention_ci", {}).get(f) for f in ("facts_common", "facts_rare"))
        if common and rare:
            order = ("rare facts fall further than common ones, as in the paper" if rare["value"] < common["value"]
                     else "rare facts do not fall further than common ones (the paper found they do)")
            clear = "" if rare["high"] < common["low"] or common["high"] < rare["low"] else " (intervals overlap)"
            parts.append(f"{LABELS[name]}: common facts keep {_ci(common)}, rare facts {_ci(rare)}: {order}{clear}.")
    return parts


PROTECTION_GROUPS = (("at the chosen K-FAC amount", "kfac", ""),
                     ("at K-FAC's tune-half loose recall", "kfac", "_matched"),
                     ("at the least edit with tune-half strict recall <= the bound", "kfac_strict", "_strict"))


def _point_of(name: str) -> str:
    """The operating point a protected variant's name ends in ("_matched", "_strict", or "")."""
    return next((point for point in ("_matched", "_strict") if name.endswith(point)), "")


def protection_section(results: dict[str, Any]) -> list[str]:
    """What protection buys and costs, at each operating point: the unprotected edit and each
    band's protected one, with held-out recall, perplexity and the retention of the arithmetic
    and closed-book bands (pooled over seeds, 95% intervals) and the mean keep fraction."""
    variants, bands = results["summary"]["variants"], results["summary"].get("paper_bands") or {}

    def keep(name: str) -> str:
        amounts = [s["variants"][name].get("plan", {}).get("rules", [{}])[0].get("keep_fraction") for s in
                   results["seeds"]]
        return "-" if None in amounts else f"{sum(amounts) / len(amounts):.3f}"

    def band(name: str, which: str) -> str:
        cell = bands.get(name, {}).get(which)
        return _ci(cell["retention"]) if cell else "-"

    parts = []
    for title, plain, suffix in PROTECTION_GROUPS:
        names = [plain, *sorted(n for n in variants if n.startswith("kfac_protect_") and _point_of(n) == suffix)]
        if plain not in variants or len(names) == 1:
            continue
        rows = [[LABELS.get(n, n), keep(n), _ci(variants[n]["intervals"]["heldout_strict"]),
                 _ci(variants[n]["intervals"]["heldout_loose"]), _ci(variants[n]["intervals"]["ppl_ratio"], False),
                 band(n, "arithmetic"), band(n, "closed-book")] for n in names]
        parts += [f"Protection {title}:", _table(["variant", "keep (seed mean)", "held-out strict", "held-out loose",
                                                  "ppl / unedited", "arithmetic retention", "closed-book retention"],
                                                 rows)]
    return parts


def implant_table(results: dict[str, Any]) -> str | None:
    """Per usable family: the base model's accuracy and each seed's implanted accuracy with its
    drift in points; then held-out perplexity and canary recall, with the issue's bounds."""
    drift = results["summary"].get("implant_drift")
    if not drift:
        return None
    base = results["base_probes"]
    rows = []
    for family in drift[0]["families"]:
        cells = []
        for seed in drift:
            d = seed["families"][family]
            cells.append(f"{100 * d['implanted']:.0f}% ({d['drift_points']:+.0f})" + ("" if d["ok"] else " **x**"))
        rows.append([family, _ci(wilson(base[family]["correct"], base[family]["n"]).to_dict()), *cells])
    rows.append(["held-out perplexity / base", "1", *[f"{d['ppl_ratio']:.3f}x" + ("" if d["ppl_ok"] else " **x**")
                                                       for d in drift]])
    rows.append(["canaries recited", "-", *[_pct(d["recall"]) for d in drift]])
    return _table(["", "base model", *[f"implanted, seed {d['seed']}" for d in drift]], rows)


def choice_section(results: dict[str, Any]) -> list[str]:
    """Per seed: the probe floor, the chosen placement, and why each other point was excluded."""
    parts = []
    for s in results["seeds"]:
        sweep = s["sweep"]
        chosen = sweep["chosen"]
        floor = sweep.get("floor")
        head = (f"Seed {s['seed']}: chose layers {chosen['layers']} {chosen['matrices']} keep {chosen['amount']:.3f}"
                f" (perplexity {chosen['perplexity'] / sweep['baseline']['perplexity']:.3f}x)")
        if floor:
            head += (f" under the probe floor {', '.join(f'{k} {v:.0%}' for k, v in floor.items())}: "
                     + ("met" if sweep.get("floor_met") else "**no point kept it; this is the perplexity-only "
                                                             "choice**"))
        excluded = [[p["label"], p["excluded"]] for p in sweep["points"] if p["excluded"]]
        parts += [head + "."] + ([_table(["point", "excluded because"], excluded)] if excluded else [])
    return parts


def retention_figure(results: dict[str, Any], path: Path) -> Path | None:
    """Bars of retention (share of the implanted model's accuracy) per usable family and variant:
    the paper's retention-by-family shape."""
    summary = results["summary"]
    families = [f for f in summary["probes_used"] if f in summary.get("probes_for_retention", [])]
    shown = [n for n in ("kfac", "paper_placement", "svd", "random_ppl", "bsn") if n in summary["variants"]]
    if not families or not shown:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(families) + 2), 4.0))
    width = 0.8 / len(shown)
    for k, name in enumerate(shown):
        pooled = summary["variants"][name].get("retention_ci", {})
        values = [100 * (pooled[f]["value"] if pooled.get(f) else summary["variants"][name]["probe_retention"][f])
                  for f in families]
        errors = [[v - 100 * pooled[f]["low"] if pooled.get(f) else 0 for v, f in zip(values, families)],
                  [100 * pooled[f]["high"] - v if pooled.get(f) else 0 for v, f in zip(values, families)]]
        ax.bar([i + k * width for i in range(len(families))], values, width, yerr=errors, capsize=2,
               label=LABELS[name])
    ax.axhline(100, color="black", linewidth=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(families))])
    ax.set_xticklabels([f"{f}\n({results['base_probes'][f]['band']})" for f in families], fontsize=7)
    ax.set_ylabel("accuracy, % of the implanted model's")
    ax.legend(fontsize=8)
    ax.set_title("What each edit keeps, by capability family")
    return save_figure(fig, path)


def layer_map_markdown(lm: dict[str, Any], figure: str, label: str) -> list[str]:
    """One layer map (`curvedit.experiments.studies.capability_stages.run_layer_map`'s dictionary): a line
    with its figure and where the middle three blocks rank, and a table of the best placements
    by recall per perplexity rise and (maps that measured it) by suffix-loss selectivity.

    Args:
        lm: the map's dictionary.
        figure: the figure's path relative to the report.
        label: what the line starts with ("Seed 0", "The demo model").
    """
    opts = lm["options"]

    def row(name: str, p: dict[str, Any]) -> list[str]:
        nats = p.get("per_nats")
        return [name, p["layers"], f"{p['forgetting']:.3f}", f"{p['ppl_rise']:.4f}", f"{p['per_ppl']:.2f}",
                "-" if nats is None else f"{p['suffix_nll_rise']:.4f}", "-" if nats is None else f"{nats:.2f}",
                "-" if p["probe_points_lost"] is None else f"{p['probe_points_lost']:.1f}"]

    rows = [row(f"{size}, by recall", p) for size, p in sorted(lm["best"].items())]
    rows += [row(f"{size}, by selectivity", p) for size, p in sorted((lm.get("best_nats") or {}).items())]
    mark = next((p for p in lm["placements"] if p["layers"] == lm["mark"]), None)
    if mark is not None:
        rows.append(row(f"{mark['size']} (the paper's kind)", mark))
    ranks = [f"{lm[key]} of {lm['groups_of_three']} by {what}" for key, what in
             (("mark_rank", "forgetting per perplexity rise"), ("mark_rank_nats", "suffix-loss selectivity"))
             if lm.get(key)]
    rank = f"the middle three blocks ({lm['mark']}) rank " + " and ".join(ranks) + " among the runs of three" if ranks \
        else ""
    forgets = sum(p["forgetting"] > 0 for p in lm["placements"])
    return [f"{label}: {opts['matrices']} at keep {opts['keep_fraction']} in each placement alone; "
            f"{forgets} of {len(lm['placements'])} placements lower the loose recall"
            + (f"; {rank}" if rank else "") + f". ![layer map]({figure})",
            _table(["blocks", "best placement", "forgetting (loose)", "ppl rise", "forgetting / ppl rise",
                    "suffix loss rise (nats)", "suffix / general loss rise", "probe points lost"], rows)]


def frontier_markdown(data: dict[str, Any], budget_nats: float, figure: str) -> list[str]:
    """A frontier (`curvedit.diagnostics.frontier.FrontierResult.to_dict`): what it traced, per method its
    least held-out loose recall within `budget_nats` per token (the chosen K-FAC edit's cost),
    and its figure."""
    frontier = FrontierResult.from_dict(data)
    rows = []
    for method, p in frontier.best_within(budget_nats).items():
        rows.append([method, "-", "-", "-", "every point costs more"] if p is None else
                    [method, f"{p.keep_fraction:g}", _ci(p.strict), _ci(p.loose), format_interval(p.nats, False, 5)])
    return [f"Each method at keep fractions {list(frontier.options.keep_fractions)} on the chosen placement: "
            "held-out memorized windows' recall against the mean loss increase on general text (nats per token, "
            "paired bootstrap; `curvedit frontier`). Per method, its lowest held-out loose recall at a cost within "
            f"the chosen K-FAC edit's ({budget_nats:.5f} nats / token):",
            _table(["method", "keep", "held-out strict", "held-out loose", "nats / token"], rows),
            *([verdict] if (verdict := frontier_verdict(frontier, budget_nats)) else []),
            f"![frontier]({figure})"]


VERDICT_WORDS = {"below": "lies below {} (clearly less held-out loose recall at that cost, the 95% intervals apart)",
                 "on": "lies on {} (the intervals overlap: no clear difference)",
                 "above": "lies above {} (clearly more recall left)",
                 "beyond the cost": "meets no point of {} (every one costs more)"}


def frontier_verdict(frontier: FrontierResult, budget_nats: float) -> str | None:
    """Is curvature the lever? One sentence from `FrontierResult.compare_within`: where K-FAC's
    frontier lies against each other method's within `budget_nats` (None without K-FAC)."""
    if "kfac" not in frontier.options.methods:
        return None
    relation = frontier.compare_within(budget_nats)
    if relation.get("kfac") == "beyond the cost":
        return "**Verdict:** no K-FAC point lies within that cost."
    clauses = [VERDICT_WORDS[kind].format(", ".join(m for m, r in relation.items() if r == kind))
               for kind in VERDICT_WORDS if kind in relation.values()]
    return "**Verdict:** within that cost K-FAC's frontier " + "; it ".join(clauses) + "."


def map_versus_sweep(seed: dict[str, Any]) -> list[str]:
    """Does the layer map predict which of the sweep's placements keep the probe families? Per
    swept placement of the map's matrices: the map's mean cost over the placement's single blocks
    (probe points lost on the probe floor's families, forgetting per perplexity rise, suffix-loss
    selectivity) beside
    whether the sweep's edit there met the floor. Empty without a map or a floor."""
    lm, sweep = seed.get("layer_map"), seed["sweep"]
    if not lm or not sweep.get("floor"):
        return []
    singles = {int(p["layers"]): p for p in lm["placements"] if p["size"] == 1}
    base = lm["unedited"]["probes"]
    held = [f for f in sweep["floor"] if f in base]
    rows, ranked = [], []
    for point in sweep["points"]:
        if point["matrices"] != lm["options"]["matrices"]:
            continue
        why = point["excluded"]
        span = [int(x) for x in point["layers"].split("-")]
        blocks = [singles[b] for b in range(span[0], span[-1] + 1) if b in singles]
        if not blocks or not held:
            continue
        lost = sum(100 * (base[f] - b["probes"][f]) for b in blocks for f in held) / (len(blocks) * len(held))
        per_ppl = sum(b["per_ppl"] for b in blocks) / len(blocks)
        nats = [b["per_nats"] for b in blocks if "per_nats" in b]
        met = "kept" not in why  # `exclusion` names a family below its floor as "<family> kept ..."
        ranked.append((lost, point["layers"], met))
        rows.append([point["layers"], f"{lost:.1f}", f"{per_ppl:.2f}",
                     f"{sum(nats) / len(nats):.2f}" if nats else "-", "yes" if met else f"no ({why})"])
    if not rows:
        return []
    order = [layers for _, layers, _ in sorted(ranked)]
    passed = [layers for _, layers, met in ranked if met]
    verdict = ("the placements that met it are the map's cheapest" if passed and set(order[:len(passed)]) == set(passed)
               else "the map's cheapest placements are not the ones that met it" if passed else "no placement met it")
    return [f"Seed {seed['seed']}: does the map predict the probe floor? Per swept {lm['options']['matrices']} "
            f"placement, the map's mean over its single blocks (probe points lost on the floor's families "
            f"{', '.join(held)}; forgetting per perplexity rise) beside the sweep's edit there. Ranked by the map's "
            f"probe cost: {', '.join(order)}; the sweep's floor: {verdict}.",
            _table(["blocks", "map: probe points lost per block", "map: forgetting / ppl rise",
                    "map: suffix / general loss rise", "sweep's edit met the probe floor"], rows)]


def layer_map_section(results: dict[str, Any]) -> list[str]:
    """Per seed with a layer map: its figure, where the middle three blocks rank, the best
    placements, and the map against the sweep's probe floor."""
    return [part for s in results["seeds"] if s.get("layer_map")
            for part in [*layer_map_markdown(s["layer_map"], f"seed-{s['seed']}/layer_map.png", f"Seed {s['seed']}"),
                         *map_versus_sweep(s)]]


def energy_table(results: dict[str, Any]) -> str | None:
    """Mean flat-energy share per canary style, of general text and of never-implanted
    canaries, per seed; then the share as a label-free score (AUROC, screen savings)."""
    seeds = [s for s in results["seeds"] if s.get("style_energy")]
    if not seeds:
        return None
    keys = [k for k in seeds[0]["style_energy"] if k != "flat_fraction"]
    table = _table(["seed", *keys], [[str(s["seed"]), *[f"{s['style_energy'][k]['mean']:.4f}" for k in keys]]
                                     for s in seeds])
    score = results["summary"].get("flat_score")
    if not score:
        return table
    auroc = score["auroc"]
    return table + (f"\n\nAs a label-free memorization score (one forward pass, no suffix decoding): AUROC of the "
                    f"{score['members']} recited canaries against {score['nonmembers']} never-implanted ones "
                    f"{auroc['value']:.3f} [{auroc['low']:.3f}, {auroc['high']:.3f}] (stratified by seed); a screen "
                    f"keeping 99% of the recited canaries would skip {score['skipped_at_99_recall']:.0%} of the "
                    "never-implanted ones.")


def targets_table(results: dict[str, Any]) -> str:
    """The issue's targets, per seed."""
    checks = results["summary"]["targets"]
    keys = [k for k in checks[0] if k != "seed"]
    return _table(["seed", *keys], [[str(c["seed"]), *["met" if c[k] else "**not met**" for k in keys]]
                                    for c in checks])


def beyond_tables(results: dict[str, Any]) -> list[str]:
    """The work beyond the paper, for the seeds that have it: EK-FAC and targeted edits against
    K-FAC at the same perplexity, and the durability attacks."""
    sections = []
    for s in results["seeds"]:
        extra = s.get("beyond")
        if not extra:
            continue
        v = s["variants"]
        unedited_ppl = v["unedited"]["perplexity"]
        rows = []
        # beside them the coherent step, the other edit built from the tune half (it deletes nothing)
        for name, row in [("kfac", v["kfac"]), *extra["variants"].items(), *[("step", v["step"])] * ("step" in v)]:
            ex = row["extraction"]
            rows.append([LABELS.get(name, name), _rates(row["heldout"]["per_window"]),
                         f"{row['heldout']['distance']:.3f}", f"{row['perplexity'] / unedited_ppl:.3f}x",
                         f"{row['stress_reference']['mean_stress']:.1f}", _pct(ex["exact_memorization"]),
                         "-" if name == "step" else f"{row['kept_components'] / row['total_components']:.3f}"])
        sections += [f"### Seed {s['seed']}: EK-FAC masses, the targeted edit and the coherent step at K-FAC's "
                     "perplexity (the last two built from the tune half; held-out canaries unseen)",
                     _table(["edit", "held-out strict / loose (95% intervals)", "distance", "ppl / unedited",
                             "stress: max prefix", "exact memorization", "components kept"], rows)]
        attacks = extra["attacks"]
        first = next(iter(attacks.values()))
        steps = [r["step"] for r in first["relearn_tune"]]
        bits = [r["bits"] for r in first["quantize"] if r["bits"] is not None]
        rows = [[LABELS.get(name, name), *[_ci(r["loose_ci"]) for r in a["relearn_tune"]],
                 *[_ci(r["loose_ci"]) for r in a["quantize"] if r["bits"] is not None],
                 f"{a['relearn_tune'][-1]['perplexity']:.3f}"] for name, a in attacks.items()]
        settings = extra["settings"]
        sections += [f"### Seed {s['seed']}: does the edit last? (held-out loose recall)",
                     f"Every weight fine-tuned on the tune-half canaries (AdamW, lr {settings['attack_lr']}, "
                     f"{settings['attack_batch']} canaries per step), and every block weight quantized "
                     "round-to-nearest per output channel in groups of 128.",
                     _table(["variant", *[f"{n} steps" for n in steps], *[f"{b}-bit" for b in bits],
                             "ppl after relearning"], rows)]
    return sections


def timing_table(results: dict[str, Any]) -> str:
    """Seconds per stage and seed, as computed (a stage read back from its record shows the time of
    the run that computed it; "-" where the record keeps none)."""
    seeds = results["seeds"]
    stages = list(dict.fromkeys(k for s in seeds for k in s["timings_s"]))
    rows = [[stage, *["-" if s["timings_s"].get(stage) is None else f"{s['timings_s'][stage]:.0f}" for s in seeds]]
            for stage in stages]
    return _table(["stage", *[f"seed {s['seed']}" for s in seeds]], rows)


def recall_figure(results: dict[str, Any], path: Path) -> Path:
    """Held-out loose recall against perplexity ratio, every variant and seed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in LABELS:
        points = [(s["variants"][name]["perplexity"] / s["variants"]["unedited"]["perplexity"],
                   s["variants"][name]["heldout"]["loose"]) for s in results["seeds"] if name in s["variants"]]
        if points:
            ax.scatter(*zip(*points), label=LABELS[name], s=40)
    ax.set_xlabel("held-out perplexity / unedited")
    ax.set_ylabel("held-out canaries, loose recall")
    ratios = [s["variants"][n]["perplexity"] / s["variants"]["unedited"]["perplexity"]
              for s in results["seeds"] for n in s["variants"]]
    if max(ratios) / min(ratios) > 3:
        ax.set_xscale("log")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=8)
    ax.set_title("SmolLM2-135M: what each edit leaves, at what cost")
    return save_figure(fig, path)


def write_study_report(results: dict[str, Any], out: Path) -> Path:
    """Write `report.md`, `recall_vs_ppl.png` and `retention.png` into `out` (from the run's
    results, or from its `results.json`: the same report)."""
    recall_figure(results, out / "recall_vs_ppl.png")
    retention = retention_figure(results, out / "retention.png")
    model = results["model"]
    opts = results["options"]
    seeds = [s["seed"] for s in results["seeds"]]
    sections = [
        f"# curvedit on a real pretrained LM: {model['name']}",
        f"Reproduce: `{results.get('command', COMMAND)}`; every stage is recorded in `{display_path(opts['out'])}/"
        f"records` (the models and factors it was measured on in `cache`). This run: device {results['device']}, "
        f"seeds {seeds}; {results['wall_s'] / 60:.0f} min of wall time for this invocation (a stage read back from "
        "its record counts only its reading).",
        f"Model: {model['name']} ({model['parameters'] / 1e6:.0f}M parameters) from "
        f"`{Path(model.get('gguf') or model.get('source') or model['name']).name}`"
        + (f" ({model['quantization']}, dequantized to float32" + (f"; wheel {model['wheel']}" if model.get('wheel')
                                                                   else "") + ")"
           if model.get("quantization") else "") + ". General text: "
        f"`{results['data']['general']}` packed into {results['data']['seq_len']}-token sequences, "
        f"{results['data']['train_sequences']} for training and factors, {results['data']['heldout_sequences']} "
        "held out.",
        f"Per seed: {opts['canaries']} canaries (styles {' / '.join(opts['styles'])}, repeat counts "
        f"{' / '.join(map(str, opts['counts']))} per pass) implanted by full fine-tuning with general text in "
        "every step"
        + (" (KL to the base model's next-token distribution on it" + (f", {opts['replay_samples']} of the base "
           "model's own samples among it" if opts.get("replay_samples") else "") + ")"
           if opts["implant"].get("preserve") == "kl" else "") + "; recited canaries split into tune and "
        f"held-out halves; factors on {opts['factor_tokens']} tokens of {opts.get('factor_data', 'pydoc')} text "
        "(sampled labels, no canary); each "
        f"layer group's keep fraction bisected to the strongest edit within {opts['ppl_budget']}x perplexity; "
        "the lowest tune-half loose recall chosen; held-out canaries measured.",
        "## Result (pooled over seeds, 95% intervals)", main_table(results),
        "Held-out canaries are pooled over seeds (n = every held-out canary of every seed): Wilson "
        "intervals for rates, bootstrap intervals for means; \"loose vs K-FAC\" is ≈ where the two loose "
        "intervals overlap (no clear difference). Perplexity ratio: paired bootstrap over (seed, held-out sequence). "
        "nDCG@10 against the unedited (implanted) model's next-token ranking with the paper's rank-graded relevance "
        "(10 for its top-1 ... 1 for its 10th). Probe retention = accuracy / unedited (implanted) accuracy, "
        "averaged over the capability families the base model gets clearly above chance (see Capabilities). "
        "Stress: the paper's position-perturbation test (t = 20: the "
        "64-token prefix extended by 1..20 suffix tokens, or cut to its last 21..63 tokens; the unperturbed prompt "
        "excluded); per canary the longest exact-match prefix over all 63 prompts, its mean in tokens, and the "
        "share of canaries whose whole 48-token suffix comes back from some prompt.",
        "## Privacy and extraction (pooled over seeds, 95% intervals)", privacy_table(results),
        "Exact memorization: share of suffix tokens the teacher-forced arg-max gets right. Extraction strength: "
        "1 - j/48 for the fewest suffix tokens j that must be given before the rest is predicted exactly. Sampled "
        "extraction: chance that at least one of 100 continuations sampled at temperature 1 is the suffix, "
        "1 - (1 - p)^100 with p the product of the suffix's sampling probabilities. Membership inference: AUROC "
        "of the held-out canaries against canaries generated the same way but never implanted (same styles and "
        "length), per score (higher = more member-like; 0.5 = indistinguishable); `reference` uses the base "
        "(pre-implant) model's loss. Definitions and sources: docs/method.md section 7.",
        "## What the definition change moved",
        "Earlier reports used the probability-graded nDCG and a filler/shift stress test; the same runs under both "
        "definitions:", definitions_table(results),
        "![recall vs perplexity](recall_vs_ppl.png)",
        "## Per seed (held-out canaries, strict / loose, 95% intervals)", seed_table(results),
        "## Per canary style (held-out, strict / loose, pooled over seeds, 95% intervals)", style_table(results),
        "## Capabilities (accuracy pooled over seeds, 95% intervals)", probe_table(results),
        "The capability suite (`curvedit.evaluate.capabilities`, generate format: greedy exact match after three "
        "solved examples). A family is usable when the lower end of the base model's 95% interval is at least "
        f"{opts.get('probe_margin', 0.1):.0%} above chance (chance: 1/answers for closed answer spaces such as "
        "Yes/No, else 0).",
        *(["## What the implant moved (usable families; drift in points against the base model)", table,
            f"Bounds of the issue: drift <= {IMPLANT_DRIFT_POINTS:g} points or inside the base model's 95% interval, "
            f"perplexity within {IMPLANT_PPL_RATIO:g}x either way; **x** marks a miss."]
          if (table := implant_table(results)) else []),
        "## How the edit was chosen", *choice_section(results),
        "## Retention by family (share of the implanted model's accuracy, pooled over seeds with a paired "
        "bootstrap 95% interval / share of the base model's, seed mean)",
        retention_table(results),
        *([f"![retention by family]({retention.name})"] if retention is not None else []),
        *(["## The paper's bands on this model",
           "Retention of every usable family of a band, pooled over seeds (paired bootstrap over items), against "
           "the paper's range for its K-FAC edit on OLMo-2; a band holds when the interval meets the range.",
           *parts] if (parts := bands_table(results)) else []),
        *(["## What protection buys and costs (pooled over seeds, 95% intervals)",
           "Each band's protected edit (`edit --protect` with factors on the band's own items) beside the "
           "unprotected K-FAC edit at three operating points: the same amount, the same removal on the tune half "
           "(loose recall), and the least edit that brings the tune half's strict recall to the bound. Held-out "
           "canaries are never seen by any of the searches.", *parts]
          if (parts := protection_section(results)) else []),
        *(["## Where each style's activation energy sits",
            "Mean share of the canary windows' (and held-out general text's) input activation energy in the "
            "flattest half of A's eigenvectors at the edited targets (`curvedit score`; higher = more in the "
            "directions the edit removes first).", table]
          if (table := energy_table(results)) else []),
        *(["## Where to cut: the layer map", *parts] if (parts := layer_map_section(results)) else []),
        *(["## Is curvature the lever? Every method on one frontier", *parts]
          if (parts := [part for s in results["seeds"] if s.get("frontier")
                        for part in [f"Seed {s['seed']}:", *frontier_markdown(
                            s["frontier"], math.log(s["variants"]["kfac"]["perplexity"]
                                                    / s["variants"]["unedited"]["perplexity"]),
                            f"seed-{s['seed']}/frontier/frontier.png")]]) else []),
        "## Targets of the issue", targets_table(results),
        *(["## Beyond the paper", *beyond_tables(results)] if any(s.get("beyond") for s in results["seeds"])
          else []),
        "## Time per stage (seconds)", timing_table(results),
        "## Figures per seed",
        "\n".join(f"- seed {s}: [sweep](seed-{s}/sweep.png), band analysis in [seed-{s}/analysis](seed-{s}/analysis)"
                  for s in seeds),
    ]
    path = out / "report.md"
    path.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return path
