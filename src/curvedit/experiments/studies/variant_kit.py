"""What one seed's variants are measured with at the sweep's chosen placement: its targets,
their eigenbases, the probe and the unedited model's next-token rankings, each made on first
use, so a seed whose variants are all recorded never loads the model."""

from __future__ import annotations

from functools import cached_property
from typing import Any

from curvedit.editing.sweep import matrices_spec
from curvedit.evaluate.perplexity import next_token_rankings
from curvedit.evaluate.windows import Window
from curvedit.experiments.studies.base import StudyData, base_losses
from curvedit.experiments.studies.implanted import ImplantedSeed
from curvedit.experiments.studies.measure import SeedProbe
from curvedit.kfac.spectrum import load_bases
from curvedit.kfac.targets import select_targets


class VariantKit:
    """The chosen placement's measuring kit for one seed.

    Args:
        seeded: the seed's model and factors.
        chosen: the sweep's chosen point (its `layers` and `matrices`).
        tune, heldout: the recited canaries' halves.
        nonmembers: never-implanted canaries as token ids (membership inference).
        tasks: the probe tasks.
        data: the study's general text.
    """

    def __init__(self, seeded: ImplantedSeed, chosen: dict[str, Any], tune: list[Window], heldout: list[Window],
                 nonmembers: list[list[int]], tasks: list[Any], data: StudyData) -> None:
        """Remember what the kit is made from; nothing is loaded yet."""
        self.seeded, self.chosen, self.tune, self.heldout = seeded, chosen, tune, heldout
        self.nonmembers, self.tasks, self.data = nonmembers, tasks, data
        self.ppl_text: list[list[int]] = data.ppl_subset(seeded.options.ppl_sequences)

    @cached_property
    def targets(self) -> list[Any]:
        """The chosen placement's weights in the implanted model."""
        return select_targets(self.seeded.model, matrices_spec(self.chosen["matrices"], self.chosen["layers"]))

    @cached_property
    def bases(self) -> dict[str, Any]:
        """The targets' Kronecker eigenbases from the seed's factors."""
        options = self.seeded.options
        return load_bases(self.targets, self.seeded.factor_dir, options.edit.device, options.edit.eigh_precision)

    @cached_property
    def probe(self) -> SeedProbe:
        """What every variant is measured on (with the base model's losses as the MIA reference)."""
        text, tokenizer = self.data.heldout, self.seeded.tokenizer
        members = [w.prefix_ids + w.suffix_ids for w in self.heldout]
        return SeedProbe(tune=self.tune, heldout=self.heldout, text=text, ppl_text=self.ppl_text,
                         tasks=self.tasks, filler=[t for s in text[-4:] for t in s], nonmembers=self.nonmembers,
                         texts={"members": [tokenizer.decode(ids) for ids in members],
                                "nonmembers": [tokenizer.decode(ids) for ids in self.nonmembers]},
                         reference_losses=base_losses(self.seeded.base_dir, {"members": members,
                                                                             "nonmembers": self.nonmembers},
                                                      self.seeded.options))

    @cached_property
    def reference(self) -> Any:
        """The unedited model's next-token rankings on the perplexity text (nDCG)."""
        return next_token_rankings(self.seeded.model, self.ppl_text, pad_id=self.seeded.pad_id,
                                   batch_size=self.seeded.options.batch_size)
