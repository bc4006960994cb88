"""The study's stages about what the model keeps and where to cut (issues "capabilities" and
"protection / placement / prose"): protected K-FAC variants per capability band, the layer
map, and where each canary style's activation energy sits.

Each function takes what `curvedit.experiments.studies.seed.run_seed` already holds (the model, its
targets and eigenbases, the canary windows) and returns JSON-ready results; the seed's stage
cache wraps them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import torch

from curvedit.data import lm_batches
from curvedit.diagnostics.flat_energy import flat_energy_by_group
from curvedit.diagnostics.layer_map import LayerMapOptions, layer_map
from curvedit.editing.protect import attach_protect_masses
from curvedit.evaluate.capabilities import FAMILIES, capability_tasks
from curvedit.evaluate.tasks import GenerateItem
from curvedit.evaluate.windows import Window
from curvedit.kfac.collect import CollectOptions, collect_factors
from curvedit.kfac.spectrum import Eigenbasis
from curvedit.kfac.targets import Target

PROTECT_BANDS = ("arithmetic", "closed-book common", "closed-book rare")


def family_texts(tokenizer: Any, families: Sequence[str], n: int, seed: int) -> list[list[int]]:
    """The solved items of capability families as token sequences (few-shot prefix, prompt and
    answer), the population a protect factor folder is collected on."""
    texts = []
    for task in capability_tasks(list(families), n=n, seed=seed):
        for item in task.items:
            assert isinstance(item, GenerateItem)
            texts.append(tokenizer(item.fewshot + item.prompt + " " + item.answers[0],
                                   add_special_tokens=False)["input_ids"])
    return [t for t in texts if len(t) >= 2]


def protected_bases(model: torch.nn.Module, bases: dict[str, Eigenbasis], targets: list[Target],
                    sequences: list[list[int]], *, pad_id: int, seed: int, batch_size: int = 8
                    ) -> dict[str, Eigenbasis]:
    """Copies of `bases` carrying the protect masses of factors collected on `sequences`
    (sampled labels, like any collection); the originals are left as they are."""
    factors = collect_factors(model, lm_batches(sequences, batch_size, pad_id), targets,
                              options=CollectOptions(seed=seed, progress=False))
    copies = {name: dataclasses.replace(basis) for name, basis in bases.items()}
    attach_protect_masses(copies, factors)
    return copies


def protect_bands(usable: Sequence[str]) -> dict[str, list[str]]:
    """Per protected band, its usable families (bands without one are left out)."""
    bands: dict[str, list[str]] = {}
    for family in usable:
        band = FAMILIES[family].band
        if band in PROTECT_BANDS:
            bands.setdefault(band, []).append(family)
    return bands


def variant_name(band: str) -> str:
    """The variant key of a band's protected edit ("kfac_protect_arithmetic")."""
    return "kfac_protect_" + band.replace("closed-book ", "facts_").replace(" ", "_")


def run_layer_map(model: torch.nn.Module, tokenizer: Any, factor_dir: Path, windows: Sequence[Window],
                  heldout: Sequence[Sequence[int]], out: Path, *, keep_fraction: float, tasks: Sequence[Any],
                  batch_size: int, progress: bool, journal: Path | None = None) -> dict[str, Any]:
    """The layer map on mlp-in (singles and runs of three), written to `out`; returns its
    dictionary with the paper's kind of placement, where it ranks among the runs of three and
    the best placements, by recall per perplexity rise and by suffix-loss selectivity. With
    `journal`, an interrupted map resumes at its next placement."""
    result = layer_map(model, tokenizer, factor_dir, windows, heldout,
                       LayerMapOptions(keep_fraction=keep_fraction, batch_size=batch_size, progress=progress),
                       tasks=tasks, journal=journal)
    result.write(out)
    threes = [p for p in result.placements if p.size == 3]

    def rank(by: str) -> int | None:
        ranked = sorted(threes, key=lambda p: -getattr(p, by))
        return next((i + 1 for i, p in enumerate(ranked) if p.layers == result.mark), None)

    def best(by: str) -> dict[int, dict[str, Any]]:
        return {size: dataclasses.asdict(p) for size in (1, 3) if (p := result.best(size, by)) is not None}

    return result.to_dict() | {"mark_rank": rank("per_ppl"), "mark_rank_nats": rank("per_nats"),
                               "groups_of_three": len(threes), "best": best("per_ppl"), "best_nats": best("per_nats")}


def style_energy(model: torch.nn.Module, targets: list[Target], bases: dict[str, Eigenbasis],
                 windows: Sequence[Window], styles: Sequence[str], general: Sequence[Sequence[int]], *,
                 pad_id: int, batch_size: int, flat_fraction: float = 0.5,
                 nonmembers: Sequence[Sequence[int]] = ()) -> dict[str, Any]:
    """Mean flat-energy share (`curvedit.diagnostics.flat_energy`) of each canary style's windows, of
    general text and of never-implanted canaries (`nonmembers`, group "nonmember"), at the
    edited targets."""
    groups = [*styles, *["general"] * len(general), *["nonmember"] * len(nonmembers)]
    sequences = ([list(w.prefix_ids) + list(w.suffix_ids) for w in windows] + [list(s) for s in general]
                 + [list(s) for s in nonmembers])
    shares = flat_energy_by_group(model, targets, bases, sequences, groups, flat_fraction=flat_fraction,
                                  pad_id=pad_id, batch_size=batch_size)  # one pass over every window and the text
    out: dict[str, Any] = {"flat_fraction": flat_fraction}
    for group in [*sorted(set(styles)), "general", *(["nonmember"] if nonmembers else [])]:
        mine = shares[group]
        out[group] = {"mean": sum(mine) / len(mine), "n": len(mine), "per_window": mine}
    return out
