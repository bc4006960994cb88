"""The demo report: a Markdown table like the paper's (every cell with its 95% interval), the
privacy and extraction metrics, the spread over label-sampling seeds, a retention-by-family
chart like its Figure 3, the chosen settings and the timings of each stage."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from curvedit.evaluate.intervals import Interval, format_interval
from curvedit.experiments.demo.measure import FAMILIES
from curvedit.experiments.studies.report import frontier_markdown, layer_map_markdown
from curvedit.plots import pyplot, save_figure

VARIANT_ORDER = ("unedited", "kfac", "ekfac", "targeted", "step", "svd", "random", "random_ppl", "bsn")
MEMORY_COLUMNS = (("memorized_strict", "tune strict"), ("memorized_loose", "tune loose"),
                  ("memorized_heldout_strict", "held-out strict"), ("memorized_heldout_loose", "held-out loose"),
                  ("memorized_heldout_lev", "held-out lev"), ("quotes_strict", "quotes strict"),
                  ("quotes_loose", "quotes loose"))


PRIVACY_COLUMNS = (("ndcg10", "nDCG@10 (rank)", False), ("stress_mean", "stress: max prefix", False),
                   ("stress_full", "stress: whole suffix %", True), ("exact_memorization", "exact mem. %", True),
                   ("extraction_strength", "extraction strength %", True),
                   ("sampled_extraction", "sampled extraction %", True), ("mia_loss", "AUROC loss", False),
                   ("mia_zlib", "AUROC zlib", False), ("mia_min_k", "AUROC min-k", False),
                   ("mia_min_k_plus_plus", "AUROC min-k++", False))


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _cell(row: dict[str, Any], key: str, percent: bool, digits: int = 3, versus: dict[str, Any] | None = None) -> str:
    """`value [low, high]` when the row holds the interval, else the value alone; "-" when
    absent; marked ≈ when the interval overlaps the one of the `versus` row (K-FAC)."""
    if key not in row:
        return "-"
    if f"{key}_ci" not in row:
        return _pct(row[key]) if percent else f"{row[key]:.{digits}f}"
    text = format_interval(row[f"{key}_ci"], percent, digits)
    if versus is not None and versus is not row and f"{key}_ci" in versus:
        if Interval(**row[f"{key}_ci"]).overlaps(Interval(**versus[f"{key}_ci"])):
            text += " ≈"
    return text


OVERLAP_NOTE = "≈: the 95% interval overlaps K-FAC's (no clear difference from K-FAC)."


def _variants(results: dict[str, Any]) -> list[str]:
    return [v for v in VARIANT_ORDER if v in results["variants"]]


def memorization_table(results: dict[str, Any]) -> str:
    """Markdown: recitation (%; lev = average normalized Levenshtein distance) and perplexity,
    each with its 95% interval."""
    header = ["variant", *[label for _, label in MEMORY_COLUMNS], "perplexity"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in _variants(results):
        row = results["variants"][name]
        kfac = results["variants"].get("kfac")
        cells = [_cell(row, k, not k.endswith("lev"), versus=kfac) for k, _ in MEMORY_COLUMNS]
        lines.append("| " + " | ".join([name, *cells, _cell(row, "perplexity", False, 4, kfac)]) + " |")
    return "\n".join(lines)


def privacy_table(results: dict[str, Any]) -> str:
    """Markdown: nDCG, the reference stress test, extraction and membership-inference AUROCs
    on the held-out memorized strings, with 95% intervals."""
    header = ["variant", *[label for _, label, _ in PRIVACY_COLUMNS]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in _variants(results):
        row = results["variants"][name]
        digits = {"stress_mean": 1}
        kfac = results["variants"].get("kfac")
        lines.append("| " + " | ".join([name, *[_cell(row, k, pct, digits.get(k, 2 if k.startswith("mia") else 3), kfac)
                                                for k, _, pct in PRIVACY_COLUMNS]]) + " |")
    return "\n".join(lines)


def label_seed_table(results: dict[str, Any]) -> str:
    """Markdown: the chosen K-FAC edit with factors from each label-sampling seed."""
    spread = results.get("label_seeds")
    if not spread:
        return "(not measured)"
    lines = ["| label seed | held-out strict | held-out loose | quotes loose | perplexity |", "|---|---|---|---|---|"]
    for seed, row in spread["per_seed"].items():
        lines.append(f"| {seed} | {_pct(row['memorized_heldout_strict'])} | {_pct(row['memorized_heldout_loose'])} | "
                     f"{_pct(row['quotes_loose'])} | {row['perplexity']:.4f} |")
    r = spread["spread"]
    lines.append(f"| range | {_pct(r['memorized_heldout_strict']['min'])}-{_pct(r['memorized_heldout_strict']['max'])}"
                 f" | {_pct(r['memorized_heldout_loose']['min'])}-{_pct(r['memorized_heldout_loose']['max'])} | "
                 f"{_pct(r['quotes_loose']['min'])}-{_pct(r['quotes_loose']['max'])} | "
                 f"{r['perplexity']['min']:.4f}-{r['perplexity']['max']:.4f} |")
    return "\n".join(lines)


def family_table(results: dict[str, Any]) -> str:
    """Markdown: accuracy per family (%, 95% Wilson interval) and retention relative to unedited."""
    base = results["variants"]["unedited"]
    header = ["variant", *FAMILIES]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in _variants(results):
        row = results["variants"][name]
        cells = []
        for family in FAMILIES:
            retention = f" ({100 * row[family] / base[family]:.0f}%)" if name != "unedited" and base[family] else ""
            cells.append(_cell(row, family, True, versus=results["variants"].get("kfac")) + retention)
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def retention_chart(results: dict[str, Any], path: Path) -> Path:
    """Grouped bars: accuracy retained (share of unedited) per family, per edited variant."""
    plt = pyplot()
    base = results["variants"]["unedited"]
    variants = [v for v in _variants(results) if v != "unedited"]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / max(1, len(variants))
    for k, name in enumerate(variants):
        values = [100 * results["variants"][name][f] / base[f] if base[f] else 0 for f in FAMILIES]
        ax.bar([i + k * width for i in range(len(FAMILIES))], values, width, label=name)
    ax.axhline(100, color="k", lw=0.8, ls="--")
    ax.set_xticks([i + width * (len(variants) - 1) / 2 for i in range(len(FAMILIES))], FAMILIES)
    ax.set_ylabel("% of unedited accuracy")
    ax.set_title("retention by family after the edit")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return save_figure(fig, path)


def durability_table(results: dict[str, Any]) -> str:
    """Markdown: held-out loose recall (%) after each relearning step count (on general text,
    on the tune half) and after quantization, per attacked variant; perplexity at the end."""
    attacked = [n for n in _variants(results) if results["variants"][n].get("attacks")]
    if not attacked:
        return "(not measured)"
    first = results["variants"][attacked[0]]["attacks"]
    steps = [row["step"] for row in first["relearn_general"]]
    bits = [row["bits"] for row in first["quantize"] if row["bits"] is not None]
    header = ["variant", *[f"general, {s} steps" for s in steps], *[f"tune half, {s} steps" for s in steps],
              *[f"{b}-bit" for b in bits], "ppl after general", "ppl after tune half"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in attacked:
        a = results["variants"][name]["attacks"]
        cells = [_cell(r, "loose", True) for r in a["relearn_general"] + a["relearn_tune"]]
        cells += [_cell(r, "loose", True) for r in a["quantize"] if r["bits"] is not None]
        cells += [_cell(a[key][-1], "perplexity", False) for key in ("relearn_general", "relearn_tune")]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def durability_chart(results: dict[str, Any], path: Path) -> Path | None:
    """Held-out loose recall against fine-tuning steps, on general text and on the tune half."""
    attacked = [n for n in _variants(results) if results["variants"][n].get("attacks")]
    if not attacked:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, key, title in zip(axes, ("relearn_general", "relearn_tune"),
                              ("fine-tuned on fresh general text", "fine-tuned on the tune half")):
        for name in attacked:
            rows = results["variants"][name]["attacks"][key]
            ax.plot([r["step"] for r in rows], [100 * r["loose"] for r in rows], "-o", ms=4, label=name)
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlabel("fine-tuning steps")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out loose recall (%)")
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return save_figure(fig, path)


def convergence_table(results: dict[str, Any]) -> str:
    """Markdown: per token budget, the share of the largest budget's kept mass its selection
    captures, and the held-out recall and perplexity of the edit made with it."""
    conv = results.get("convergence")
    if not conv:
        return "(not measured)"
    lines = ["| factors | captured share | held-out strict | held-out loose | perplexity |", "|---|---|---|---|---|"]
    gold = conv.get("gold")
    labelled = [(f"{row['tokens']} tokens, sampled labels", row, row["captured"]) for row in conv["rows"]]
    if gold:
        labelled.append((f"{gold['tokens']} tokens, gold labels", gold, gold["captured_gold_in_sampled"]))
    for label, row, captured in labelled:
        lines.append(f"| {label} | {captured:.4f} | {_cell(row, 'strict', True)} | {_cell(row, 'loose', True)} | "
                     f"{_cell(row, 'perplexity', False, 4)} |")
    return "\n".join(lines)


def timings_table(timings: dict[str, float]) -> str:
    """Markdown table of seconds per stage."""
    rows = "\n".join(f"| {stage} | {seconds} |" for stage, seconds in timings.items())
    return f"| stage | seconds |\n|---|---|\n{rows}"


def frontier_section(results: dict[str, Any]) -> str:
    """Is curvature the lever? The frontier at the chosen placement, judged within the chosen
    K-FAC edit's cost (or nothing without a frontier)."""
    if not results.get("frontier"):
        return ""
    kfac_cost = math.log(results["variants"]["kfac"]["perplexity"] / results["variants"]["unedited"]["perplexity"])
    return ("## Is curvature the lever? Every method on one frontier\n\n"
            + "\n\n".join(frontier_markdown(results["frontier"], kfac_cost, "frontier/frontier.png")) + "\n\n")


def flat_score_section(results: dict[str, Any]) -> str:
    """The label-free score: AUROC of the flat-energy share, memorized windows against
    never-trained strings and against general text (or nothing without a score)."""
    score = results.get("flat_score")
    if not score:
        return ""
    mean, n = score["mean"], score["n"]
    rows = []
    for other, label in (("nonmembers", "never-trained strings like them"), ("general", "fresh general text")):
        versus = score[f"vs_{other}"]
        rows.append(f"| memorized ({n['memorized']}) vs {label} ({n[other]}) | {format_interval(versus['auroc'])} | "
                    f"{100 * versus['skipped_at_99_recall']:.0f}% | {mean['memorized']:.4f} vs {mean[other]:.4f} |")
    return ("## A label-free memorization score: the flat-energy share\n\n"
            f"The share of a window's input energy in the flattest {score['flat_fraction']:.0%} of A's eigenvectors "
            "at the chosen placement, averaged over its targets (`curvedit score`; one forward pass, no labels). "
            "Skipped: the share of the other group a screen keeping 99% of the memorized windows passes over.\n\n"
            "| comparison | AUROC [95% CI] | skipped at 99% recall | mean share |\n|---|---|---|---|\n"
            + "\n".join(rows) + "\n\n")


def layer_map_section(results: dict[str, Any]) -> str:
    """Where to cut: the layer map's figure and best placements, with a blank line after (or
    nothing without a map)."""
    lm = results.get("layer_map")
    if not lm:
        return ""
    parts = layer_map_markdown(lm, "layer_map.png", "The demo model")
    return ("## Where to cut: the layer map (tune half)\n\n" + "\n\n".join(parts)
            + "\n\nForgetting: tune-half loose recall lost; ppl rise: held-out perplexity / unedited - 1.\n\n")


def write_report(results: dict[str, Any], out: Path) -> Path:
    """Write `report.md` and `retention.png` into `out`; returns the report path."""
    retention_chart(results, out / "retention.png")
    durability_chart(results, out / "durability.png")
    chosen = results["settings"]["chosen"]
    bands = "\n\n".join(f"![bands]({p.relative_to(out)})" for p in sorted((out / "analysis").glob("bands_layer*.png")))
    found, candidates = results["memorized_found"], results["memorized_candidates"]
    notes = "\n".join(f"- **{name}**: {results['variants'][name]['settings'].get('note', '')}"
                      for name in _variants(results) if results["variants"][name]["settings"].get("note"))
    full = results.get("full", True)
    levers = layer_map_section(results) + frontier_section(results) + flat_score_section(results)
    full_sections = f"""## Spread over label-sampling seeds

The chosen K-FAC edit, re-applied with factors collected on the same text under other seeds
of the sampled labels:

{label_seed_table(results)}

## Does the edit last? (held-out loose recall, %)

Every weight fine-tuned (AdamW, lr {results["settings"].get("attack_lr", "-")}, 16 sequences per step) on fresh
general text, or on the tune half of the memorized strings (a relearning attack: does learning
half bring back the other half?); and every block weight quantized round-to-nearest per output
channel in groups of 32 inputs.

{durability_table(results)}

![durability](durability.png)

## How much data do the factors need?

The chosen edit made with factors from nested prefixes of the factors' text; "captured share" is
the share of the largest budget's kept curvature mass that each budget's own selection holds
(1 = the same subspace; docs/method.md section 12).

{convergence_table(results)}

![convergence](converge.png)

""" if full else ""
    bands_section = f"""## Curvature bands (paper's Figures 2 and 4)

Mean |v^T x| of each target's inputs on memorized (held-out half, suffix positions) vs general
text, per band of the K-FAC order and of the SVD order; `analysis/bands.json` holds the numbers.

{bands}

![bottom-band share vs accuracy drop per family](analysis/families.png)

""" if full else (
        "The stages beyond the headline (durability attacks, EK-FAC, the targeted edit, BalancedSubnet, the label-seed "
        "spread, the convergence study, the layer map and the band analysis) run with `curvedit demo --full`; "
        "docs/demo/ holds such a run.\n\n")
    text = f"""# curvedit demo report

Memorized windows found by `find_memorized` (recited verbatim by the unedited model):
tune {found['tune']}/{candidates['tune']}, held-out {found['heldout']}/{candidates['heldout']},
quotes {found['quotes']}/{candidates['quotes']}. Metrics on memorized sets are over those windows.

## Recitation (%) and perplexity, with 95% intervals

{memorization_table(results)}

Intervals: Wilson for rates, bootstrap over windows for lev, over held-out sequences for perplexity.
{OVERLAP_NOTE}

Chosen on the tune half only (lowest tune loose accuracy with perplexity at most
{results['settings']['ppl_budget']}x unedited): layers `{chosen['layers']}`, matrices `{chosen['matrices']}`,
{chosen['amount_kind']} = {chosen['amount']}.
Factors: {results['settings']['factor_tokens']} tokens of general text, sampled labels,
{100 * results['settings']['factor_memorized_share']:.1f}% of them memorized strings/quotes.

{notes}

## Privacy and extraction (held-out memorized strings), with 95% intervals

{privacy_table(results)}

nDCG@10 against the unedited model's ranking (the paper's rank-graded relevance). Stress: the
paper's position perturbations (t = 20), longest exact-match prefix over all perturbed prompts
per window (mean, tokens) and the share of windows whose whole suffix comes back. Exact
memorization: teacher-forced share of suffix tokens predicted exactly; extraction strength:
1 - j/k for the fewest suffix tokens j given before the rest is predicted exactly; sampled
extraction: chance that one of 100 samples at temperature 1 is the suffix. AUROC: held-out
memorized strings against never-trained strings of the same generator (0.5 = indistinguishable).
Definitions: docs/method.md. {OVERLAP_NOTE}

{full_sections}{levers}## Accuracy by family (%; retention vs unedited in parentheses)

{family_table(results)}

![retention by family](retention.png)

![sweep on the tune half](sweep/sweep.png)

{bands_section}## Timings (s)

{timings_table(results["timings_s"])}
"""
    path = out / "report.md"
    path.write_text(text)
    return path
