"""The SmolLM2 study's report: Markdown tables and figures from its `results.json`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from curvedit.evaluate.intervals import Interval, bootstrap_mean, wilson
from curvedit.plots import pyplot, save_figure

LABELS = {"unedited": "unedited (implanted)", "kfac": "K-FAC", "random_count": "random, K-FAC's count",
          "random_ppl": "random, matched ppl", "svd": "SVD, matched ppl", "bsn": "BalancedSubnet"}
COMMAND = "curvedit study smollm2"


def _pct(x: float | None) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f}%"


def _table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def pooled_intervals(results: dict[str, Any], name: str) -> dict[str, Interval]:
    """Held-out canary strict and loose (Wilson) and distance (bootstrap), pooled over seeds."""
    rows = [w for s in results["seeds"] for w in s["variants"][name]["heldout"]["per_window"]]
    return {"strict": wilson(sum(w["strict"] for w in rows), len(rows)),
            "loose": wilson(sum(w["loose"] for w in rows), len(rows)),
            "distance": bootstrap_mean([w["distance"] for w in rows])}


def _ci(interval: Interval, percent: bool = True) -> str:
    if percent:
        return f"{100 * interval.value:.1f}% [{100 * interval.low:.0f}, {100 * interval.high:.0f}]"
    return f"{interval.value:.3f} [{interval.low:.3f}, {interval.high:.3f}]"


def main_table(results: dict[str, Any]) -> str:
    """Variant x metrics: held-out recitation pooled over seeds with 95% intervals, the rest
    as means over seeds."""
    summary = results["summary"]
    used = summary["probes_used"]
    kfac = pooled_intervals(results, "kfac") if "kfac" in summary["variants"] else None
    rows = []
    for name, v in summary["variants"].items():
        pooled = pooled_intervals(results, name)
        retention = v["probe_retention"]
        versus = ("-" if kfac is None or name == "kfac"
                  else "overlaps" if pooled["loose"].overlaps(kfac["loose"]) else "clear")
        rows.append([LABELS.get(name, name), _ci(pooled["strict"]), _ci(pooled["loose"]),
                     _ci(pooled["distance"], percent=False), versus, f"{v['perplexity']:.3f}",
                     f"{v['ppl_ratio']:.3f}x", f"{v['ndcg10']:.3f}",
                     _pct(sum(retention.values()) / len(retention)) if retention else "-",
                     _pct(v["stress_exact"].get("right_shift_8"))])
    return _table(["variant", "held-out strict [95% CI]", "held-out loose [95% CI]", "distance [95% CI]",
                   "loose vs K-FAC", "perplexity", "ppl / unedited", "nDCG@10",
                   f"probe retention ({len(summary.get('probes_for_retention', used))} families)",
                   "stress: shift 8 exact"], rows)


def seed_table(results: dict[str, Any]) -> str:
    """Per seed: implant, found canaries, the chosen edit, K-FAC and controls' held-out loose recall."""
    rows = []
    for s in results["seeds"]:
        v, chosen = s["variants"], s["sweep"]["chosen"]
        imp = s["implant"]
        rows.append([str(s["seed"]), f"{imp['steps']}", _pct(imp["recall"]),
                     f"{imp['perplexity_before']:.3f} -> {imp['perplexity_after']:.3f}",
                     f"{s['found']['tune']}+{s['found']['heldout']}",
                     f"layers {chosen['layers']} {chosen['matrices']}, keep {chosen['amount']:.3f}",
                     *[f"{_pct(v[n]['heldout']['strict'])} / {_pct(v[n]['heldout']['loose'])}" for n in
                       ("unedited", "kfac", "random_ppl", "svd", "bsn")],
                     f"{v['kfac']['perplexity'] / v['unedited']['perplexity']:.3f}x"])
    return _table(["seed", "implant steps", "canaries recited", "ppl base -> implanted", "found (tune+held-out)",
                   "chosen edit", "unedited strict/loose", "K-FAC", "random (ppl)", "SVD (ppl)", "BSN",
                   "K-FAC ppl"], rows)


def style_table(results: dict[str, Any]) -> str:
    """Held-out strict / loose per canary style, means over seeds."""
    variants = results["summary"]["variants"]
    styles = list(next(iter(variants.values()))["by_style"])
    rows = [[LABELS.get(n, n), *[f"{_pct(v['by_style'][st]['strict'])} / {_pct(v['by_style'][st]['loose'])}"
                                 for st in styles]] for n, v in variants.items()]
    return _table(["variant", *[f"{st} strict / loose" for st in styles]], rows)


def probe_table(results: dict[str, Any]) -> str:
    """Base accuracy of every probe family, and accuracy per variant (seed mean)."""
    base = results["base_probes"]
    names = list(results["summary"]["variants"])
    rows = []
    for family, acc in base.items():
        per = [sum(s["variants"][n]["probes"].get(family, float("nan")) for s in results["seeds"])
               / len(results["seeds"]) for n in names]
        rows.append([family, _pct(acc), "yes" if family in results["summary"]["probes_used"] else "no",
                     *[_pct(x) for x in per]])
    return _table(["probe", "base model", "used", *[LABELS.get(n, n) for n in names]], rows)


def targets_table(results: dict[str, Any]) -> str:
    """The issue's targets, per seed."""
    checks = results["summary"]["targets"]
    keys = [k for k in checks[0] if k != "seed"]
    return _table(["seed", *keys], [[str(c["seed"]), *["met" if c[k] else "**not met**" for k in keys]]
                                    for c in checks])


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
    """Write `report.md` and `recall_vs_ppl.png` into `out`."""
    recall_figure(results, out / "recall_vs_ppl.png")
    model = results["model"]
    opts = results["options"]
    seeds = [s["seed"] for s in results["seeds"]]
    sections = [
        "# curvedit on a real pretrained LM: SmolLM2-135M-Instruct",
        f"Reproduce: `{COMMAND}` (or `make study-smollm2`); stages are cached in `{opts['out']}/cache`. "
        f"This run: device {results['device']}, seeds {seeds}; {results['wall_s'] / 60:.0f} min of wall time for "
        "this invocation (a stage read back from the cache counts only its reading).",
        f"Model: {model['name']} ({model['parameters'] / 1e6:.0f}M parameters) from `{Path(model['gguf']).name}`"
        f" ({model['quantization']}, dequantized to float32; wheel {model['wheel']}). General text: "
        f"`{results['data']['general']}` packed into {results['data']['seq_len']}-token sequences, "
        f"{results['data']['train_sequences']} for training and factors, {results['data']['heldout_sequences']} "
        "held out.",
        f"Per seed: {opts['canaries']} canaries (styles words / record / code, repeat counts {opts['counts']} per "
        f"pass) implanted by full fine-tuning with general text in every step; recited canaries split into tune and "
        f"held-out halves; factors on {opts['factor_tokens']} general tokens (sampled labels, no canary); each "
        f"layer group's keep fraction bisected to the strongest edit within {opts['ppl_budget']}x perplexity; "
        "the lowest tune-half loose recall chosen; held-out canaries measured.",
        "## Result (mean over seeds)", main_table(results),
        "Held-out canaries are pooled over seeds (n = every held-out canary of every seed): Wilson "
        "intervals for the rates, a bootstrap interval for the distance; \"loose vs K-FAC\" says whether the "
        "two loose intervals overlap. Perplexity on all held-out text; nDCG@10 against the unedited (implanted) "
        "model's next-token ranking; "
        "probe retention = accuracy / unedited accuracy over the probe families the base model gets right "
        "(>= 50%) and the implanted model still gets right sometimes (see Probes: the implant itself costs a lot); "
        "stress = share of held-out canaries recited whole from a prompt shifted 8 tokens into the suffix.",
        "![recall vs perplexity](recall_vs_ppl.png)",
        "## Per seed (held-out canaries, strict / loose)", seed_table(results),
        "## Per canary style (held-out, strict / loose, mean over seeds)", style_table(results),
        "## Probes", probe_table(results),
        "## Targets of the issue", targets_table(results),
        "## Figures per seed",
        "\n".join(f"- seed {s}: [sweep](seed-{s}/sweep.png), band analysis in [seed-{s}/analysis](seed-{s}/analysis)"
                  for s in seeds),
    ]
    path = out / "report.md"
    path.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return path
