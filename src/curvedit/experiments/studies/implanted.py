"""One seed's implanted model and its factors, each built on first use and checked against
the records a study keeps.

A seed's stage records (`StudyOptions.records`) are small and meant to be committed; the
artifacts they were measured on (the implanted model, the factors) stay in the cache and are
rebuilt when missing. A seed whose every stage is recorded is read back without implanting
or collecting. When a stage still has to run on another machine, the rebuilt model and
factors must be the ones the records were measured on (same SHA-256), or the study stops:
a resume never mixes two runs.
"""

from __future__ import annotations

import json
import time
from fnmatch import fnmatch
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from curvedit.data import default_pad_id, lm_batches
from curvedit.experiments.stages import cached, content_key
from curvedit.experiments.studies.base import StudyData
from curvedit.experiments.studies.canary_stage import SELF_SAMPLES, factor_sequences, implant_key, implant_seed
from curvedit.experiments.studies.options import FACTOR_DATA, StudyError, StudyOptions
from curvedit.io import write_json
from curvedit.kfac.collect import CollectOptions, collect_factors
from curvedit.kfac.factors import save_factors
from curvedit.kfac.targets import TargetSpec, select_targets
from curvedit.memorize.implant import model_weights_sha256


def factor_folder_sha256(folder: Path) -> str:
    """The content of a factor folder: the SHA-256 of every target's A and G as `factors.json`
    lists them (independent of when it was written, and of an EK-FAC correction added to it
    later)."""
    meta = json.loads((folder / "factors.json").read_text())
    return content_key({name: {k: target["sha256"][k] for k in ("A", "G")} for name, target in meta["targets"].items()})


class ImplantedSeed:
    """One seed's implanted model, tokenizer, factor text and factors, made on first use.

    Args:
        base_dir: the base model's HF folder (`prepare_base`).
        seed: the implant seed.
        data: the study's general text.
        options: the study's settings.
        base: the base model's description (`prepare_base`).
    """

    def __init__(self, base_dir: Path, seed: int, data: StudyData, options: StudyOptions,
                 base: dict[str, Any]) -> None:
        """Remember the seed's inputs; nothing is loaded yet."""
        self.base_dir, self.seed, self.data, self.options, self.base = base_dir, seed, data, options, base
        self.records = options.records / f"seed-{seed}"
        self.cache = options.cache / f"seed-{seed}"

    @cached_property
    def implant_key(self) -> str:
        """The implant's content key (`implant_key`)."""
        return implant_key(self.seed, self.data, self.options, self.base)

    @cached_property
    def model_key(self) -> str:
        """The key every stage measured on the implanted model depends on."""
        return content_key({"implant": self.implant_key})

    def _first_records(self, record: str, allowed: tuple[str, ...]) -> None:
        """Refuse to write `record` (a model's or factors' fingerprint) into a seed folder that
        already holds records measured downstream of it (any but the `allowed` name patterns):
        which model those were measured on could no longer be checked."""
        names = (p.relative_to(self.records).as_posix() for p in self.records.rglob("*.json"))
        later = sorted(n for n in names if not any(fnmatch(n, pattern) for pattern in (record, *allowed)))
        if later:
            raise StudyError(f"seed {self.seed}: {self.records} holds {', '.join(later[:3])}"
                             f"{' ...' if len(later) > 3 else ''} but no {record} of this run, so what they were "
                             "measured on cannot be checked; move that folder aside to measure the seed afresh")

    @cached_property
    def implant(self) -> dict[str, Any]:
        """The implant's record: the implanted weights' SHA-256 and the implant manifest
        (canaries, result); implants the model only when no record holds this key.

        Raises:
            StudyError: the seed's records hold later stages but no implant record of this key.
        """
        def compute() -> dict[str, Any]:
            self._first_records("implant.json", ())
            folder, digest, _ = self._implanted
            return {"weights_sha256": digest,
                    "manifest": json.loads((folder / "curvedit-implant.json").read_text())}

        return cached(self.records / "implant.json", self.implant_key, compute)

    @cached_property
    def _implanted(self) -> tuple[Path, str, torch.nn.Module]:
        """(folder, weights SHA-256, model): the cached implanted model, implanted anew when missing."""
        from transformers import AutoModelForCausalLM  # noqa: PLC0415

        folder = implant_seed(self.base_dir, self.seed, self.data, self.options, self.base)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(self.options.device).eval()
        return folder, model_weights_sha256(model), model

    @cached_property
    def model(self) -> torch.nn.Module:
        """The implanted model, the one the records were measured on.

        Raises:
            StudyError: the model implanted here differs from the recorded one.
        """
        _, digest, model = self._implanted
        recorded = self.implant["weights_sha256"]
        if digest != recorded:
            raise StudyError(
                f"seed {self.seed}: the model implanted here (weights {digest[:12]}) is not the one the records in "
                f"{self.records} were measured on ({recorded[:12]}); the implant is not reproducible on this machine. "
                "Move that folder aside to measure the seed afresh; its records are kept, not mixed with new ones")
        return model

    @cached_property
    def tokenizer(self) -> Any:
        """The tokenizer (the base model's: an implant does not change it)."""
        from transformers import AutoTokenizer  # noqa: PLC0415

        return AutoTokenizer.from_pretrained(self.base_dir)

    @cached_property
    def pad_id(self) -> int:
        """The padding token id."""
        return default_pad_id(self.tokenizer)

    @cached_property
    def n_layers(self) -> int:
        """The model's number of blocks, from its configuration."""
        from transformers import AutoConfig  # noqa: PLC0415

        return AutoConfig.from_pretrained(self.base_dir).num_hidden_layers

    @cached_property
    def factor_text(self) -> list[list[int]]:
        """The factors' token sequences (`factor_sequences`; the model's own samples are recorded)."""
        return factor_sequences(self.model, self.tokenizer, self.data, self.options, self.seed, self.model_key)

    @cached_property
    def factor_key(self) -> str:
        """The factors' content key: the model and the factor text's settings."""
        options = self.options
        return content_key({"model": self.model_key, "tokens": options.factor_tokens, "batch": options.factor_batch,
                            **({"data": options.factor_data} if options.factor_data != "pydoc" else {})})

    @cached_property
    def factors(self) -> dict[str, Any]:
        """The factors' record (their SHA-256); collects them only when no record holds this key.

        Raises:
            StudyError: the seed's records hold later stages but no factor record of this key.
        """
        def compute() -> dict[str, Any]:
            self._first_records("factors.key.json", ("implant.json", "found.json", SELF_SAMPLES.format(count="*")))
            return {"sha256": self._collected}

        return cached(self.records / "factors.key.json", self.factor_key, compute)

    @cached_property
    def factor_dir(self) -> Path:
        """The factor folder in the cache, collected anew when missing, and the one the records
        were measured on.

        Raises:
            StudyError: the factors collected here differ from the recorded ones.
        """
        digest = self._collected
        if digest != self.factors["sha256"]:
            raise StudyError(
                f"seed {self.seed}: the factors collected here ({digest[:12]}) are not the ones the records in "
                f"{self.records} were measured on ({self.factors['sha256'][:12]}). Move that folder aside to measure "
                "the seed afresh")
        return self.cache / "factors"

    @cached_property
    def _collected(self) -> str:
        """The SHA-256 of the cached factor folder, collecting it first when it is missing, stale
        or collected on another model than the recorded one."""
        folder, stamp = self.cache / "factors", self.cache / "factors" / "study-key.json"
        model = {"key": self.factor_key, "weights_sha256": self.implant["weights_sha256"]}
        if not (stamp.is_file() and {k: json.loads(stamp.read_text()).get(k) for k in model} == model):
            start = time.perf_counter()
            text = self.factor_text
            targets = select_targets(self.model, TargetSpec(preset="mlp"))
            factors = collect_factors(self.model, lm_batches(text, self.options.factor_batch, self.pad_id), targets,
                                      options=CollectOptions(seed=self.seed, progress=self.options.progress,
                                                             total_tokens=sum(len(s) for s in text),
                                                             description=FACTOR_DATA[self.options.factor_data]))
            save_factors(factors, folder)
            write_json(stamp, model | {"seconds": round(time.perf_counter() - start, 1)})
        return factor_folder_sha256(folder)
