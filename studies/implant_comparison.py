"""Which implant leaves SmolLM2 itself? Base vs implanted, per capability family.

Run: `python studies/implant_comparison.py [--variants ce,kl-replay,...] [--seed 0]`
(needs the study's base model: `curvedit study smollm2` prepares it in
`studies/smollm2/cache/base-hf`, or pass `--base DIR`). Each variant implants the study's 24
canaries (styles words / record / code, counts 4, 8, 16) into the base model, then measures
canary recall, held-out pydoc perplexity, the KL from the base on held-out text and the
capability suite (generate format). Results are cached per variant in
`studies/smollm2/cache/implant-comparison/`; the table goes to
`studies/smollm2/implant_comparison.md` and `.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from curvedit.data import default_pad_id
from curvedit.evaluate.capabilities import capability_tasks, score_families
from curvedit.evaluate.intervals import wilson
from curvedit.evaluate.perplexity import perplexity
from curvedit.evaluate.sampling import SampleOptions, sample_sequences
from curvedit.evaluate.tasks import TaskOptions, run_tasks
from curvedit.experiments.studies.base import general_sequences
from curvedit.experiments.studies.options import StudyOptions
from curvedit.io import write_json
from curvedit.memorize.canaries import STYLES, generate_canaries
from curvedit.memorize.implant import ImplantOptions, general_split, implant, mean_kl

STUDY = StudyOptions()
# the study's implant until this comparison: cross-entropy replay of pydoc text at a constant lr 5e-4
EARLIER = ImplantOptions(prefix_len=64, suffix_len=48, lr=5e-4, max_steps=160, eval_every=10, seq_len=96,
                         canaries_per_step=4, general_per_step=2, checkpoint_every=50)
VARIANTS = {
    "ce-pydoc": EARLIER,
    "kl-pydoc": replace(EARLIER, preserve="kl"),
    "kl-replay": replace(EARLIER, preserve="kl"),
    "ce-replay": replace(EARLIER, preserve="ce"),
    "kl-replay-cosine": replace(EARLIER, preserve="kl", lr=3e-4, lr_schedule="cosine", max_steps=200),
    # pydoc text and the model's own samples together, a stronger KL anchor, a gentler decaying rate:
    # the study's implant since this comparison (StudyOptions().implant)
    "kl-mix-gentle": replace(EARLIER, preserve="kl", kl_weight=5.0, lr=3e-4, lr_schedule="cosine", max_steps=200,
                             general_per_step=4),
}
REPLAY_SAMPLES = 512


def measure(model, tokenizer, base, heldout: list[list[int]], items: int) -> dict:
    """Perplexity, KL from the base and the capability suite of one model."""
    pad = default_pad_id(tokenizer)
    scores = score_families(run_tasks(model, tokenizer, capability_tasks(n=items, seed=0), TaskOptions(batch_size=32),
                                      pad_id=pad))
    return {"perplexity": perplexity(model, heldout, pad_id=pad, batch_size=8).perplexity,
            "kl_from_base": mean_kl(base, model, heldout, pad) if base is not model else 0.0,
            "families": {s.family: s.to_dict() for s in scores}}


def write_report(results: dict, path: Path) -> None:
    """The comparison as a Markdown table: per variant, recall, perplexity, KL and every family."""
    base = results["base"]
    families = list(base["families"])
    names = [k for k in results if k != "base"]
    usable = [f for f in families if base["families"][f]["usable"]]

    def cell(row: dict, family: str) -> str:
        score = row["families"][family]
        shift = (score["accuracy"] - base["families"][family]["accuracy"]) * 100
        text = f"{score['accuracy']:.0%} [{score['ci'][0]:.0%}, {score['ci'][1]:.0%}]"
        return text if row is base else f"{text} ({shift:+.0f})"

    lines = ["# Which implant leaves SmolLM2 itself?", "",
             "Reproduce: `python studies/implant_comparison.py --variants " + ",".join(
                 sorted({n.split(":")[0] for n in names})) + "`. Base: SmolLM2-135M-Instruct (the study's GGUF, "
             "dequantized). Canaries: the study's 24 (words / record / code, counts 4, 8, 16), prefix 64, suffix 48. "
             "Held-out text: the study's first 48 held-out pydoc sequences. Capability suite: generate format, "
             "seed 0, up to 100 items per family; 95% Wilson intervals; (+/-) = points against the base model. "
             "A family is usable when the base model's interval clears chance by 10 points.", "",
             "| | base | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names),
             "| canaries recited | - | " + " | ".join(
                 f"{results[n]['recall']:.0%} [{results[n]['recall_ci'][0]:.0%}, {results[n]['recall_ci'][1]:.0%}]"
                 for n in names) + " |",
             f"| held-out perplexity | {base['perplexity']:.2f} | " + " | ".join(
                 f"{results[n]['perplexity']:.2f} ({results[n]['perplexity'] / base['perplexity']:.3f}x)"
                 for n in names) + " |",
             "| KL from the base (nats/token) | 0 | " + " | ".join(
                 f"{results[n]['kl_from_base']:.4f}" for n in names) + " |",
             "| implant steps / seconds | - | " + " | ".join(
                 f"{results[n]['steps']} / {results[n]['seconds']:.0f}" for n in names) + " |"]
    for family in families:
        mark = "" if family in usable else " (not usable)"
        lines.append(f"| {family}{mark} | {cell(base, family)} | " + " | ".join(
            cell(results[n], family) for n in names) + " |")
    def drift(name: str) -> float:
        return max(abs(results[name]["families"][f]["accuracy"] - base["families"][f]["accuracy"]) for f in usable)

    lines += ["", "Largest drift over the usable families (points): "
              + ", ".join(f"{n} {drift(n) * 100:.0f}" for n in names) + "."]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    """Run the comparison (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=STUDY.cache / "base-hf")
    parser.add_argument("--variants", default="ce-pydoc,kl-replay")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--out", type=Path, default=STUDY.out)
    parser.add_argument("--report-only", action="store_true", help="Only rewrite the Markdown from the JSON.")
    args = parser.parse_args()
    results_path = args.out / "implant_comparison.json"
    if args.report_only:
        write_report(json.loads(results_path.read_text()), args.out / "implant_comparison.md")
        return
    torch.manual_seed(0)
    cache = args.out / "cache" / "implant-comparison"
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).eval()
    train, heldout = general_split(general_sequences(tokenizer, STUDY.implant.seq_len), STUDY.heldout_share, 0)
    heldout = heldout[:STUDY.ppl_sequences]
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if "base" not in results:
        results["base"] = measure(base, tokenizer, base, heldout, args.items)
        write_json(results_path, results)
    canaries = generate_canaries(STUDY.canaries, args.seed, STYLES, STUDY.counts)  # words / record / code
    for name in args.variants.split(","):
        key = f"{name}:seed-{args.seed}"
        if key in results:
            continue
        start = time.perf_counter()
        options = replace(VARIANTS[name], seed=args.seed)
        general = train
        if "replay" in name or "mix" in name:
            samples_path = cache / f"replay-seed-{args.seed}.json"
            if samples_path.is_file():
                samples = json.loads(samples_path.read_text())
            else:
                samples = sample_sequences(base, tokenizer, SampleOptions(n=REPLAY_SAMPLES, seq_len=options.seq_len,
                                                                          seed=args.seed, batch_size=64))
                write_json(samples_path, samples)
            general = samples + train if "mix" in name else samples
        model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).eval()
        done = implant(model, tokenizer, canaries, general, heldout, cache / key.replace(":", "-"), options)
        row = measure(model, tokenizer, base, heldout, args.items)
        recited = sum(done.recited)
        row.update(recall=recited / len(done.recited), recall_ci=[wilson(recited, len(done.recited)).low,
                                                                  wilson(recited, len(done.recited)).high],
                   steps=done.steps, options=options.fingerprint_fields(),
                   general={"replay": f"replay:{REPLAY_SAMPLES}", "mix": f"replay:{REPLAY_SAMPLES} + pydoc_data.topics"}
                   .get(next((k for k in ("replay", "mix") if k in name), ""), "pydoc_data.topics"),
                   seconds=round(time.perf_counter() - start, 1))
        results[key] = row
        write_json(results_path, results)
        print(key, json.dumps({k: row[k] for k in ("recall", "perplexity", "kl_from_base", "steps", "seconds")}),
              flush=True)
        write_report(results, args.out / "implant_comparison.md")


if __name__ == "__main__":
    main()
