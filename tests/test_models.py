"""`restored` undoes what a block changes in a model; `display_path` shows paths as a report should."""

from __future__ import annotations

import pytest
import torch

from curvedit.models import restored


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)).eval()


def test_every_parameter_buffer_and_the_mode_come_back() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with restored(model):
        model.train()
        model(torch.randn(8, 3))  # moves the batch-norm running statistics
        with torch.no_grad():
            model[0].weight.add_(1.0)
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_only_the_named_weights_come_back_and_also_after_an_error() -> None:
    model = _model()
    first, last = model[0].weight.clone(), model[2].weight.clone()
    with pytest.raises(RuntimeError), restored(model, [model[0].weight]):
        with torch.no_grad():
            model[0].weight.mul_(0.0)
            model[2].weight.mul_(0.0)
        raise RuntimeError("a failing stage")
    assert torch.equal(model[0].weight, first)
    assert torch.equal(model[2].weight, torch.zeros_like(last))


def test_a_report_shows_a_path_below_the_working_directory_relative_to_it(tmp_path, monkeypatch):
    from curvedit.io import display_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "studies").mkdir()
    assert display_path(tmp_path / "studies" / "study.toml") == "studies/study.toml"
    assert display_path("/elsewhere/study.toml") == "/elsewhere/study.toml"
