"""The work beyond the paper on the study's `beyond_seeds`: EK-FAC masses, the targeted edit
and durability attacks (relearning, quantization).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from curvedit.data import default_pad_id, lm_batches
from curvedit.diagnostics.attack import RelearnOptions, quantization_rows, recall_and_perplexity, relearn_curve
from curvedit.editing.balanced_subnet import BSNOptions, bsn_within_budget
from curvedit.editing.budget import bisect_amount, match_tolerance
from curvedit.editing.edit import EditPlan, apply_edit
from curvedit.editing.targeted import attach_forget_masses, forget_masses
from curvedit.experiments.studies.measure import SeedProbe, edit_and_measure
from curvedit.experiments.studies.options import StudyOptions
from curvedit.kfac.collect import CollectOptions
from curvedit.kfac.eigencorrect import eigencorrect_factors
from curvedit.kfac.spectrum import load_bases
from curvedit.models import restored


@dataclass(frozen=True)
class BeyondSettings:
    """The work beyond the paper on the study (one seed; see `beyond_paper`).

    Attributes:
        attack_steps: relearning steps on the tune half after which held-out recall is measured.
        attack_lr: the attacker's AdamW learning rate.
        attack_batch: canaries per relearning step.
        attack_bits: quantization widths.
        attacked: the variants attacked.
    """

    attack_steps: tuple[int, ...] = (0, 10, 30)
    attack_lr: float = 1e-4
    attack_batch: int = 4
    attack_bits: tuple[int, ...] = (4,)
    attacked: tuple[str, ...] = ("unedited", "kfac", "targeted", "bsn")


BEYOND = BeyondSettings()


def beyond_paper(model, tokenizer, targets, bases, factor_dir: Path, factor_text: list[list[int]], probe: SeedProbe,
                 reference: Any, options: StudyOptions, *, seed: int, kfac_plan: Any, kfac_ppl: float,
                 unedited_ppl: float, bsn_ratio: float, retain: list[list[int]]) -> dict[str, Any]:
    """EK-FAC masses (a second pass over the factors' text) and the targeted edit (forget set =
    the tune half), each matched to K-FAC's perplexity and measured like the other variants;
    then relearning on the tune half and quantization of unedited, K-FAC, targeted and
    BalancedSubnet, judged by held-out canary recall and perplexity."""
    pad_id = default_pad_id(tokenizer)
    eigencorrect_factors(model, lm_batches(factor_text, options.factor_batch, pad_id), targets, factor_dir,
                         options=CollectOptions(seed=seed, progress=options.progress,
                                                total_tokens=sum(len(s) for s in factor_text)))
    corrected = load_bases(targets, factor_dir, options.edit.device, options.edit.eigh_precision)
    attach_forget_masses(corrected, forget_masses(model, probe.tune, targets, corrected, pad_id=pad_id,
                                                  batch_size=options.batch_size))
    out: dict[str, Any] = {"variants": {}, "attacks": {}, "settings": asdict(BEYOND)}
    plans = {"kfac": kfac_plan}
    for name in ("ekfac", "targeted"):
        search = bisect_amount(model, targets, corrected, probe.ppl_text, mode="match", target_ppl=kfac_ppl,
                               unedited_ppl=unedited_ppl, settings=replace(options.edit, masses=name),
                               steps=options.bisect_steps + 2, tolerance=match_tolerance(kfac_ppl, unedited_ppl),
                               batch_size=options.batch_size, pad_id=pad_id)
        plans[name] = EditPlan([search.rule()], replace(options.edit, masses=name))
        out["variants"][name] = edit_and_measure(model, tokenizer, targets, corrected, plans[name], probe, reference,
                                                  options) | {"matched": search.to_dict()}

    def judge(m) -> dict[str, Any]:
        return recall_and_perplexity(m, probe.heldout, probe.ppl_text, pad_id=pad_id, batch_size=options.batch_size)

    relearn = RelearnOptions(steps=BEYOND.attack_steps, lr=BEYOND.attack_lr, batch_size=BEYOND.attack_batch, seed=seed,
                             progress=options.progress)
    tune_text = [w.prefix_ids + w.suffix_ids for w in probe.tune]

    def attack() -> dict[str, Any]:
        return {"relearn_tune": relearn_curve(model, tune_text, judge, relearn, pad_id=pad_id),
                "quantize": quantization_rows(model, judge, BEYOND.attack_bits, group_size=128)}

    for name in BEYOND.attacked:
        if name in plans:
            applied = apply_edit(targets, plans[name], corrected)
            try:
                out["attacks"][name] = attack()
            finally:
                applied.undo()
        elif name == "bsn":
            with restored(model, [t.module.weight for t in targets]):
                bsn_within_budget(model, targets, tune_text, retain[: max(4 * len(tune_text), 32)], probe.tune,
                                  probe.ppl_text, (bsn_ratio,), options.ppl_budget * unedited_ppl,
                                  BSNOptions(epochs=options.bsn_epochs, lr=options.bsn_lr, seed=seed, batch_size=16,
                                             progress=options.progress), pad_id=pad_id, batch_size=options.batch_size)
                out["attacks"][name] = attack()
        else:
            out["attacks"][name] = attack()
    return out
