"""`curvedit study status`: what a study's records already hold and what is left to run,
per seed, read without computing anything (`records_only`).

A long study runs across sessions or machines; its records (`StudyOptions.records`) travel
with the repository, its cache does not. The status says, per seed, how many stages are
recorded and what they cost to compute, the first stage still to run, whether the cache here
holds the implanted model and factors that stage needs (else they are rebuilt first), and
an estimate of what is left from the seconds the other seeds' records hold for the same
stages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from curvedit.experiments.stages import NotRecorded, compute_seconds, records_only
from curvedit.experiments.studies.base import StudyData, base_probes, general_sequences, prepare_base
from curvedit.experiments.studies.implanted import ImplantedSeed
from curvedit.experiments.studies.options import StudyError, StudyOptions
from curvedit.experiments.studies.seed import BEYOND_RECORDS, run_seed
from curvedit.experiments.studies.summary import usable_families
from curvedit.memorize.implant import general_split


@dataclass
class SeedStatus:
    """Where one seed stands.

    Attributes:
        seed: the implant seed.
        recorded: {record file relative to the seed's records: compute seconds (None: not kept)}.
        next_record: the record file (relative to the seed's records) of the first stage still to
            run ("base-probes.json" before any seed; None: every stage is recorded).
        cached_model: the cache holds an implanted model for this seed.
        cached_factors: the cache holds factors for this seed.
        left_s: an estimate of the seconds left (None: no other seed recorded those stages).
        stopped: why the recorded stages end the seed (a `StudyError`), else None.
    """

    seed: int
    recorded: dict[str, float | None] = field(default_factory=dict)
    next_record: str | None = None
    cached_model: bool = False
    cached_factors: bool = False
    left_s: float | None = None
    stopped: str | None = None

    @property
    def recorded_s(self) -> float:
        """The compute seconds the seed's records hold."""
        return sum(s for s in self.recorded.values() if s is not None)


def stamp_key(folder: Path) -> str | None:
    """The key a cached artifact's `study-key.json` holds (None when there is none)."""
    stamp = folder / "study-key.json"
    return json.loads(stamp.read_text()).get("key") if stamp.is_file() else None


def seed_records(folder: Path) -> dict[str, float | None]:
    """Every stage record under `folder` (journals left out) with the compute seconds it holds
    (a record of another key counts too: the estimate is rough by design)."""
    return {p.relative_to(folder).as_posix(): compute_seconds(p) for p in sorted(folder.rglob("*.json"))}


def study_status(options: StudyOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Read a study's records stage by stage as `run_study` would, running no stage (the base
    model is prepared as `run_study` prepares it: fetched and converted into the cache when
    missing).

    Args:
        options: the study's settings (`load_study_config`).
        log: progress lines of preparing the base model.

    Returns:
        `base_probes_recorded` and `seeds`, one `SeedStatus` per seed of the study.
    """
    from transformers import AutoTokenizer  # noqa: PLC0415

    options.validate()
    base_dir, base = prepare_base(options, log)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    train, heldout = general_split(general_sequences(tokenizer, options.implant.seq_len, options.general),
                                   options.heldout_share, 0)
    data = StudyData(train=train, heldout=heldout)
    statuses = []
    with records_only():
        try:
            used = usable_families(base_probes(base_dir, options))
        except NotRecorded:
            return {"base_probes_recorded": False,
                    "seeds": [SeedStatus(seed=s, next_record="base-probes.json") for s in options.seeds]}
        for seed in options.seeds:
            folder, cache = options.records / f"seed-{seed}", options.cache / f"seed-{seed}"
            seeded = ImplantedSeed(base_dir, seed, data, options, base)
            status = SeedStatus(seed=seed, cached_model=stamp_key(cache / "implanted") == seeded.implant_key,
                                cached_factors=stamp_key(cache / "factors") == seeded.factor_key)
            try:
                run_seed(base_dir, seed, data, options, base, used, log=lambda _: None,
                         beyond=seed in options.beyond_seeds)
            except NotRecorded as missing:
                status.next_record = missing.path.relative_to(folder).as_posix()
            except StudyError as stopped:  # the records say the seed cannot go on (no usable half, no point)
                status.stopped = str(stopped)
            status.recorded = seed_records(folder) if folder.is_dir() else {}
            statuses.append(status)
    for status in statuses:
        if status.next_record is not None:
            status.left_s = estimate_left(status, statuses, beyond=status.seed in options.beyond_seeds)
    return {"base_probes_recorded": True, "seeds": statuses}


def estimate_left(status: SeedStatus, statuses: list[SeedStatus], beyond: bool) -> float | None:
    """The seconds a seed still needs: per record another seed holds and this one lacks (the
    beyond seeds' own stages only when `beyond`), the most seconds any seed's record of it
    took (None when no seed has recorded more)."""
    lacking: dict[str, float] = {}
    for other in statuses:
        for name, seconds in other.recorded.items():
            if name not in status.recorded and seconds is not None and (beyond or name not in BEYOND_RECORDS):
                lacking[name] = max(lacking.get(name, 0.0), seconds)
    return sum(lacking.values()) if lacking else None


def status_table(status: dict[str, Any]) -> str:
    """The status as a Markdown table, one row per seed."""
    rows = ["| seed | stages recorded | their compute | next to run | cache here | left (by the other seeds) |",
            "|---|---|---|---|---|---|"]
    for s in status["seeds"]:
        cache = ", ".join(part for part, held in (("model", s.cached_model), ("factors", s.cached_factors)) if held)
        left = "-" if s.next_record is None else "?" if s.left_s is None else f"{s.left_s / 3600:.1f} h"
        step = f"stopped: {s.stopped}" if s.stopped else s.next_record or "done"
        rows.append(f"| {s.seed} | {len(s.recorded)} | {s.recorded_s / 3600:.1f} h | {step} | "
                    f"{cache or 'empty'} | {left} |")
    if not status["base_probes_recorded"]:
        rows.append("\nThe base model's probes are not recorded yet: the study starts there.")
    return "\n".join(rows)
