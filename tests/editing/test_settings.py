"""`EditSettings`: how an edit is made, declared once and checked in one place."""

from __future__ import annotations

import pytest

from curvedit.editing.edit import EditPlan, EditRule
from curvedit.editing.settings import EditError, EditSettings
from curvedit.editing.sweep import SweepError, SweepOptions
from curvedit.experiments.studies.seed import sweep_key_fields


@pytest.mark.parametrize("given, message", [
    ({"method": "magic"}, "unknown method 'magic'"), ({"masses": "heavy"}, "unknown masses 'heavy'"),
    ({"compute_dtype": "float16"}, "compute_dtype must be one of"), ({"eigh_precision": "half"}, "eigh precision"),
    ({"seed": 1.5}, "seed must be an integer"), ({"seed": True}, "seed must be an integer"),
    ({"method": "identity"}, "masses 'saliency'")])
def test_a_bad_setting_is_refused_by_name(given, message):
    with pytest.raises(EditError, match=message):
        EditSettings(**given)


def test_a_plan_and_a_sweep_carry_the_one_settings_object():
    settings = EditSettings(method="random", seed=3, compute_dtype="float32")
    assert EditPlan([EditRule(rho=0.5)], settings).settings is settings
    assert EditPlan([EditRule(rho=0.5)]).settings == EditSettings()
    with pytest.raises(EditError, match="must be an EditSettings"):
        EditPlan([EditRule(rho=0.5)], "random")
    with pytest.raises(EditError, match="need method kfac"):
        EditPlan([EditRule(rho=0.5, side="G")], EditSettings(method="svd"))
    options = SweepOptions(settings=settings)
    options.validate()
    object.__setattr__(options.settings, "method", "magic")  # a settings object changed behind validate's back
    with pytest.raises(SweepError, match="unknown method"):
        options.validate()


def test_the_study_keys_a_sweep_as_it_did_before_the_settings_object():
    """Hours of cached sweeps stay valid: the key's fields are flat, defaults left out."""
    options = SweepOptions(ppl_budget=1.05, bisect_budget=True, bisect_steps=6, progress=True,
                           settings=EditSettings(compute_dtype="float32"))
    assert sweep_key_fields(options, None) == {
        "metric": "loose", "ppl_budget": 1.05, "loose_threshold": 0.75, "batch_size": 16, "bisect_budget": True,
        "bisect_knob": "keep_fraction", "bisect_steps": 6, "progress": 0, "seed": 0, "compute_dtype": "float32",
        "device": None}
    ekfac = SweepOptions(settings=EditSettings(masses="ekfac", eigh_precision="float32"))
    assert {"masses": "ekfac", "eigh_precision": "float32"}.items() <= sweep_key_fields(ekfac, [100, ["cloze"]]).items()
