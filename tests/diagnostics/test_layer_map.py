"""The layer map: the same small edit at every placement, forgetting per unit of cost."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from curvedit.cli import app
from curvedit.diagnostics.layer_map import LayerMapError, LayerMapOptions, layer_map, middle_three, placements_of
from curvedit.editing.sweep import SweepGrid, SweepOptions, run_sweep
from tests.helpers import factors_and_windows


def test_placements_are_every_run_of_consecutive_blocks_and_the_paper_s_is_the_middle_three():
    assert placements_of(4, (1, 3)) == ["0", "1", "2", "3", "0-2", "1-3"]
    assert middle_three(30) == "13-15" and middle_three(2) == "0-1"


def test_each_placement_is_the_sweep_point_of_its_blocks_and_the_ratios_follow(world):  # noqa: F811
    model, factors, windows, heldout = world
    before = {k: v.clone() for k, v in model.state_dict().items()}
    options = LayerMapOptions(matrices="mlp", keep_fraction=0.3, group_sizes=(1, 2), progress=False)
    result = layer_map(model, None, factors, windows, heldout, options)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [p.layers for p in result.placements] == ["0", "1", "0-1"]
    direct = run_sweep(model, None, factors, SweepGrid(layers=("0", "1", "0-1"), matrices=("mlp",),
                                                       keep_fraction=(0.3,)), windows, heldout,
                       SweepOptions(ppl_budget=None, progress=False))
    for placement, point in zip(result.placements, direct.points):
        assert placement.loose == point.loose and placement.perplexity == pytest.approx(point.perplexity)
        rise = point.perplexity / direct.baseline.perplexity - 1
        assert placement.ppl_rise == pytest.approx(rise)
        assert placement.forgetting == pytest.approx(direct.baseline.loose - point.loose)
        assert placement.per_ppl == pytest.approx(placement.forgetting / max(rise, 1e-3))
        assert placement.probe_points_lost is None and placement.per_probe_point is None
        held = point.suffix_nll - direct.baseline.suffix_nll  # the memorized suffixes' loss, teacher-forced
        assert placement.suffix_nll_rise == pytest.approx(held)
        assert placement.loss_rise == pytest.approx(math.log(point.perplexity / direct.baseline.perplexity))
        assert placement.per_nats == pytest.approx(held / max(placement.loss_rise, 1e-3))
    assert result.best(1) in result.placements[:2] and result.best(1, "per_nats") in result.placements[:2]


@pytest.mark.parametrize("changes, message", [({"keep_fraction": 1.0}, "keep fraction"),
                                              ({"group_sizes": (0,)}, "group sizes"), ({"floor": 0.0}, "floor")])
def test_bad_layer_map_options_are_refused(changes, message):
    with pytest.raises(LayerMapError, match=message):
        LayerMapOptions(**changes).validate()


def test_cli_layer_map_writes_the_table_and_the_figure(tmp_path, lm_dir, text_jsonl):
    factors, memorized = factors_and_windows(tmp_path, lm_dir, text_jsonl)
    out = tmp_path / "map"
    result = CliRunner().invoke(app, ["layer-map", "--model", str(lm_dir), "--factors", str(factors), "--memorized",
                                      str(memorized), "--heldout", str(text_jsonl), "--heldout-seq-len", "16",
                                      "--keep-fraction", "0.5", "--group-sizes", "1", "--out", str(out),
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "layer_map.json").read_text())
    assert [p["layers"] for p in data["placements"]] == ["0", "1"] and data["mark"] == "0-1"
    assert (out / "layer_map.png").stat().st_size > 0
