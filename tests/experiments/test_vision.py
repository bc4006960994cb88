"""The vision demo: label noise, splits, image sources, training determinism, the choice of
the edit, and an end-to-end smoke run of `curvedit demo --vision`.

Factor collection on ViTs (CLS and all positions) against a brute-force reference is
tested in tests/test_collect.py::test_vit_factors_equal_brute_force_reference; the demo
uses that same code path (`ImageClassificationObjective`), so it is not repeated here.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from curvedit.cli import app
from curvedit.data import DataError
from curvedit.experiments.demo.vision import Candidate, choose_candidate, default_layer_grid
from curvedit.experiments.demo.vision_data import (
    DIGITS,
    VisionDataConfig,
    corrupt_labels,
    digits_images,
    image_processor,
    load_images,
    split_and_corrupt,
)
from curvedit.experiments.demo.vision_train import VisionTrainConfig, train_vision_model

METRICS = {"noisy_memorized", "noisy_true_label", "heldout_accuracy", "clean_train_accuracy"}


@pytest.mark.parametrize("n, fraction", [(1438, 0.1), (1437, 0.1), (101, 0.25), (10, 0.05), (50, 1.0), (7, 0.0)])
def test_label_noise_hits_exactly_the_fraction_and_never_the_true_class(n, fraction):
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(n))
    noisy, chosen = corrupt_labels(labels, fraction, 10, torch.Generator().manual_seed(1))
    assert len(chosen) == round(fraction * n) == len(set(chosen.tolist()))
    changed = (noisy != labels).nonzero().flatten()
    assert sorted(changed.tolist()) == sorted(chosen.tolist())  # every chosen label changed, nothing else
    assert noisy.min() >= 0 and noisy.max() < 10
    again, chosen_again = corrupt_labels(labels, fraction, 10, torch.Generator().manual_seed(1))
    assert torch.equal(noisy, again) and torch.equal(chosen, chosen_again)


def test_label_noise_with_two_classes_flips_to_the_other_class():
    labels = torch.tensor([0, 1] * 20)
    noisy, chosen = corrupt_labels(labels, 0.5, 2, torch.Generator().manual_seed(0))
    assert torch.equal(noisy[chosen], 1 - labels[chosen])


@pytest.mark.parametrize("kwargs, message", [({"fraction": 1.5}, "in \\[0, 1\\]"), ({"num_classes": 1}, "two classes"),
                                             ({"num_classes": 3}, "must be in \\[0, 3\\)")])
def test_label_noise_rejects_bad_requests(kwargs, message):
    args = {"labels": torch.tensor([0, 4, 2]), "fraction": 0.5, "num_classes": 10,
            "generator": torch.Generator().manual_seed(0), **kwargs}
    with pytest.raises(DataError, match=message):
        corrupt_labels(**args)


def test_split_partitions_the_images_and_corrupts_only_training_labels():
    config = VisionDataConfig(DIGITS, 8, max_images=300, noise_fraction=0.1, heldout_fraction=0.2, tune_fraction=0.5)
    images = load_images(config)
    split = split_and_corrupt(images, config)
    assert images.pixels.shape == (300, 3, 8, 8) and images.classes == [str(c) for c in range(10)]
    assert sorted(torch.cat([split.train, split.heldout]).tolist()) == list(range(300))
    assert len(split.heldout) == 60 and len(split.noisy) == round(0.1 * 240) == 24
    assert len(split.noisy_tune) == len(split.noisy_eval) == 12
    assert set(split.noisy.tolist()) | set(split.clean.tolist()) == set(split.train.tolist())
    assert not set(split.noisy.tolist()) & set(split.clean.tolist())
    differs = (split.train_labels != images.labels).nonzero().flatten()
    assert sorted(differs.tolist()) == sorted(split.noisy.tolist())
    again = split_and_corrupt(images, config)
    assert torch.equal(again.train_labels, split.train_labels) and torch.equal(again.noisy_eval, split.noisy_eval)


def test_split_refuses_a_set_too_small_for_every_part():
    config = VisionDataConfig(DIGITS, 8, max_images=20, noise_fraction=0.05)
    with pytest.raises(DataError, match="too few"):
        split_and_corrupt(load_images(config), config)


def test_an_image_folder_of_exported_digits_gives_the_digits_pixels(tmp_path):
    images, labels, _ = digits_images()
    for index in range(30):
        folder = tmp_path / "digits" / str(labels[index])
        folder.mkdir(parents=True, exist_ok=True)
        images[index].save(folder / f"{index:04d}.png")
    from_digits = load_images(VisionDataConfig(DIGITS, 8, max_images=30))
    from_folder = load_images(VisionDataConfig(source=str(tmp_path / "digits"), image_size=8))
    order = sorted(range(30), key=lambda i: (str(labels[i]), i))  # the folder's order: class, then file name
    classes = from_folder.classes
    assert torch.equal(from_folder.pixels, from_digits.pixels[order])
    assert [classes[k] for k in from_folder.labels.tolist()] == [str(labels[i]) for i in order]
    with pytest.raises(DataError, match="neither 'glyphs', 'digits' nor a folder"):
        load_images(VisionDataConfig(source=str(tmp_path / "missing")))


def test_training_is_deterministic_and_saves_a_loadable_model(tmp_path):
    from transformers import AutoImageProcessor, ViTForImageClassification

    data = VisionDataConfig(DIGITS, 8, max_images=80)
    config = VisionTrainConfig(data=data, patch_size=4, hidden=16, layers=1, heads=2, intermediate=16, epochs=2,
                               batch_size=16, warmup_steps=2)
    images = load_images(data)
    split = split_and_corrupt(images, data)
    first = train_vision_model(config, images, split, tmp_path / "a", progress=False)
    second = train_vision_model(config, images, split, tmp_path / "b", progress=False)
    weights_a, weights_b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    meta = json.loads((first / "curvedit-train.json").read_text())
    assert meta["config_hash"] == config.config_hash(images.fingerprint)
    model = ViTForImageClassification.from_pretrained(first)
    assert model.config.num_labels == 10 and model.config.id2label[3] == "3"
    processor = AutoImageProcessor.from_pretrained(first)
    digit = digits_images()[0][0]
    assert torch.equal(processor(images=[digit], return_tensors="pt")["pixel_values"],
                       image_processor(8)(images=[digit], return_tensors="pt")["pixel_values"])


def _candidate(true_label: float, memorized: float, guard: float, other: float = 0.0) -> Candidate:
    return Candidate("kfac", "0", "rho", 0.9, 1, 10, 0.9,
                     {"tune_true_label": true_label, "tune_memorized": memorized, "validation_accuracy": guard,
                      "clean_train_accuracy": other})


def test_choice_maximises_recovery_within_the_guard_budget():
    candidates = [_candidate(0.9, 0.0, 0.80), _candidate(0.6, 0.2, 0.99), _candidate(0.6, 0.1, 0.985),
                  _candidate(0.5, 0.0, 1.0)]
    assert choose_candidate(candidates, baseline=1.0, budget=0.02) == 2  # 0 is over budget; 2 beats 1 on memory
    assert choose_candidate(candidates, baseline=1.0, budget=0.5) == 0
    assert choose_candidate(candidates[:1], baseline=1.0, budget=0.02) is None


def test_choice_can_guard_clean_training_accuracy_instead():
    candidates = [_candidate(0.9, 0.0, 1.0, other=0.5), _candidate(0.6, 0.2, 0.5, other=1.0)]
    assert choose_candidate(candidates, baseline=1.0, budget=0.02) == 0
    assert choose_candidate(candidates, baseline=1.0, budget=0.02, guard="clean_train_accuracy") == 1


def test_validation_images_are_split_off_the_held_out_images_at_random():
    config = VisionDataConfig(DIGITS, 8, max_images=300)
    split = split_and_corrupt(load_images(config), config)
    parted = split.split_validation(0.5, seed=1)
    assert len(parted.validation) == 30 and len(parted.heldout) == 30
    assert sorted(torch.cat([parted.validation, parted.heldout]).tolist()) == split.heldout.tolist()
    assert not torch.equal(parted.validation, split.heldout[:30])  # not simply the first half
    assert torch.equal(parted.noisy_eval, split.noisy_eval) and parted.counts()["validation"] == 30
    with pytest.raises(DataError, match="leaves a part empty"):
        split.split_validation(0.001, seed=1)


def test_default_layer_grid_has_each_layer_then_first_and_last_then_all():
    assert default_layer_grid(4) == ("0", "1", "2", "3", "0,3", "0-3")
    assert default_layer_grid(2) == ("0", "1", "0-1")
    assert default_layer_grid(1) == ("0",)


def test_vision_demo_smoke_writes_report_and_results(tmp_path):
    out = tmp_path / "vision"
    result = CliRunner().invoke(app, ["demo", "--vision", "--smoke", "--out", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert set(results["variants"]) == {"unedited", "kfac", "svd", "random", "svd_matched", "random_matched"}
    for variant in results["variants"].values():
        assert METRICS <= set(variant) and all(0 <= variant[m] <= 1 for m in METRICS)
        assert all(variant[f"{m}_ci"]["low"] <= variant[m] <= variant[f"{m}_ci"]["high"] for m in METRICS)
        assert "settings" in variant and "timings_s" in variant
    for name in ("svd_matched", "random_matched"):
        settings = results["variants"][name]["settings"]
        assert settings["target_validation_accuracy"] == results["variants"]["kfac"]["validation_accuracy"]
        assert 1 <= len(settings["search"]) <= 3 and isinstance(settings["matched"], bool)
    layers = results["settings"]["train"]["layers"]
    assert [(r["block"], r["sublayer"]) for r in results["ablation"]] == [
        (b, k) for b in range(layers) for k in ("attention", "mlp")]
    assert results["settings"]["chosen"]["kfac"]["method"] == "kfac"
    kfac, rand = results["variants"]["kfac"]["settings"], results["variants"]["random"]["settings"]
    assert kfac["kept_components"] == rand["kept_components"]
    assert {"train_or_load", "collect", "ablate", "sweep", "matched_controls", "report"} <= set(results["timings_s"])
    report = (out / "report.md").read_text()
    assert report.startswith("# curvedit vision demo report") and "What the network uses" in report
    assert all((out / png).stat().st_size > 0 for png in ("rho_curve.png", "ablation.png", "frontier.png"))
    assert {(c["layers"], c["method"]) for c in results["frontier"]} <= {
        (layers, method) for layers in (results["settings"]["chosen"]["kfac"]["layers"], "0,1")
        for method in ("kfac", "svd", "random")}
    assert any(c["method"] == "kfac" for c in results["frontier"])
    chosen_layers = results["settings"]["chosen"]["kfac"]["layers"]
    assert {p["layers"] for p in results["curve"]} == {chosen_layers, "0,1"}  # the chosen layers and first+last
    assert len(results["curve"]) == len({chosen_layers, "0,1"}) * len(results["settings"]["rho_grid"])
    weights = Path(results["settings"]["model_dir"]) / "model.safetensors"
    written = weights.stat().st_mtime_ns
    again = CliRunner().invoke(app, ["demo", "--vision", "--smoke", "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert weights.stat().st_mtime_ns == written  # the cached model was reused, not retrained
