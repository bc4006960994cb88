"""Is curvature the lever on SmolLM2? The frontier of every method on one finished study seed.

Run: `python studies/smollm2_frontier.py [--seed 0] [--threads 2]` after `curvedit study smollm2`
has run that seed (it reads the seed's implanted model, factors, sweep choice and held-out
canaries from `studies/smollm2/cache/seed-N/`). At the placement the seed's sweep chose, every
method of `curvedit frontier` (K-FAC, saliency, magnitude pruning, noise of the edit's norm in
its block, random components, SVD) is applied in memory at each of the study's `frontier_keep`
amounts; held-out canary recall is measured against the cost in nats per token on the study's
held-out pydoc text (the same sequences the sweep's perplexity used). This is the study's
`frontier` stage, which otherwise runs only on its beyond seeds, on one seed alone. Writes
`studies/smollm2/seed-N/frontier/frontier.{json,png}`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from curvedit.editing.sweep import matrices_spec
from curvedit.evaluate.windows import Window
from curvedit.experiments.studies.base import general_sequences
from curvedit.experiments.studies.config import load_study_config
from curvedit.experiments.studies.seed import seed_frontier
from curvedit.kfac.targets import select_targets
from curvedit.memorize.implant import general_split

STUDY = Path(__file__).parent / "smollm2"


def main() -> None:
    """Trace the frontier for one seed and print where each method lands."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = load_study_config(STUDY / "study.toml")
    folder = options.cache / f"seed-{args.seed}"
    model = AutoModelForCausalLM.from_pretrained(folder / "implanted", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder / "implanted")
    swept = json.loads((folder / "sweep.key.json").read_text())["value"]
    chosen = swept["points"][swept["chosen"]]
    targets = select_targets(model, matrices_spec(chosen["matrices"], chosen["layers"]))
    heldout = [Window(**w) for w in json.loads((folder / "found.json").read_text())["value"]["heldout"]]
    _, general = general_split(general_sequences(tokenizer, options.implant.seq_len, options.general),
                               options.heldout_share, 0)
    start = time.perf_counter()
    result = seed_frontier(model, tokenizer, folder / "factors", targets, heldout, general[: options.ppl_sequences],
                           options, args.seed)
    out = options.out / f"seed-{args.seed}" / "frontier"
    print(f"layers {chosen['layers']} {chosen['matrices']}: {len(heldout)} held-out canaries, "
          f"{time.perf_counter() - start:.0f} s; wrote {out}")
    for point in result.points:
        print(f"{point.method:10s} keep {point.keep_fraction:.2f}  strict {point.strict['value']:.3f}  "
              f"loose {point.loose['value']:.3f}  nats {point.nats['value']:.5f} "
              f"[{point.nats['low']:.5f}, {point.nats['high']:.5f}]")


if __name__ == "__main__":
    main()
