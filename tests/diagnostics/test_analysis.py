"""Activation bands: memorized inputs planted in the low-curvature directions are found there."""

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from curvedit.cli import app
from curvedit.diagnostics.analysis import (
    AnalysisError,
    BandOptions,
    band_analysis,
    band_bounds,
    band_labels,
    task_family_shares,
    write_task_families,
)
from curvedit.evaluate.windows import Window
from curvedit.kfac.factors import TargetFactors
from curvedit.kfac.spectrum import eigenbasis
from curvedit.kfac.targets import Target

D_IN, D_OUT = 20, 8



class EmbedLinear(nn.Module):
    """Each token id stands for a chosen input vector x, read by one Linear target."""

    def __init__(self, vectors):
        super().__init__()
        self.embed = nn.Embedding.from_pretrained(vectors)
        self.mlp = nn.Linear(D_IN, D_OUT, bias=False).double()

    def forward(self, input_ids, attention_mask=None):
        return self.mlp(self.embed(input_ids))


def planted_world(n=200):
    """A layer whose A has eigenvectors U (columns) with eigenvalues decreasing in j.

    Clean inputs have coordinate scale 0.8**j along u_j (mostly the top directions);
    memorized inputs the reverse, 0.8**(19-j) (mostly the bottom, low-mass directions).
    Token ids 0..n-1 are clean inputs, n..2n-1 memorized ones.
    """
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=g, dtype=torch.float64))[0]
    j = torch.arange(D_IN, dtype=torch.float64)
    clean = (torch.randn(n, D_IN, generator=g, dtype=torch.float64) * 0.8 ** j) @ u.T
    memorized = (torch.randn(n, D_IN, generator=g, dtype=torch.float64) * 0.8 ** (D_IN - 1 - j)) @ u.T
    torch.manual_seed(0)
    model = EmbedLinear(torch.cat([clean, memorized]))
    a = u @ torch.diag(2.0 ** -j) @ u.T
    basis = eigenbasis(TargetFactors(A=a, G=torch.eye(D_OUT, dtype=torch.float64), positions=1))
    clean_seqs = [list(range(i, i + 10)) for i in range(0, n, 10)]
    windows = [Window(list(range(n + i, n + i + 4)), list(range(n + i + 4, n + i + 10))) for i in range(0, n, 10)]
    return model, Target("mlp", model.mlp, 0), {"mlp": basis}, windows, clean_seqs


def direct_band_means(x_rows, basis_columns, edges=(0.1, 0.25, 0.5)):
    per_vector = (x_rows @ basis_columns).abs().mean(dim=0)
    return [float(per_vector[a:b].mean()) for a, b in band_bounds(D_IN, edges)]


def test_bands_are_cut_by_fractions_of_the_basis():
    assert band_bounds(20) == [(0, 2), (2, 5), (5, 10), (10, 20)]
    assert band_bounds(16) == [(0, 2), (2, 4), (4, 8), (8, 16)]  # 1.6 -> 2
    assert band_labels() == ["0-10%", "10-25%", "25-50%", "50-100%"]
    with pytest.raises(AnalysisError, match="too few"):
        band_bounds(3)
    with pytest.raises(AnalysisError, match="increasing"):
        BandOptions(edges=(0.5, 0.25)).validate()


def test_memorized_inputs_in_low_mass_directions_rise_toward_the_bottom_band():
    model, target, bases, windows, clean = planted_world()
    result = band_analysis(model, [target], bases, windows, clean, BandOptions(positions="all", progress=False))
    ratios = [b.ratio for b in result.targets[0].kfac]
    assert all(a < b for a, b in zip(ratios, ratios[1:])), ratios
    assert ratios[0] < 0.5 and ratios[-1] > 2
    assert result.memorized_positions == result.clean_positions == 200


def test_kfac_and_svd_numbers_match_a_direct_computation():
    model, target, bases, windows, clean = planted_world()
    result = band_analysis(model, [target], bases, windows, clean, BandOptions(positions="all", progress=False))
    vectors = model.embed.weight
    mem_x, clean_x = vectors[200:], vectors[:200]
    v = torch.linalg.svd(model.mlp.weight.detach(), full_matrices=True).Vh.T  # right singular vectors, by s
    bands = result.targets[0]
    for basis_columns, rows in ((bases["mlp"].U_A, bands.kfac), (v, bands.svd)):
        torch.testing.assert_close([b.memorized for b in rows], direct_band_means(mem_x, basis_columns))
        torch.testing.assert_close([b.clean for b in rows], direct_band_means(clean_x, basis_columns))
        torch.testing.assert_close([b.ratio for b in rows], [b.memorized / b.clean for b in rows])


def test_suffix_positions_are_those_that_predict_suffix_tokens():
    model, target, bases, windows, clean = planted_world()
    result = band_analysis(model, [target], bases, windows, clean, BandOptions(progress=False))
    assert result.memorized_positions == len(windows) * 6
    counted = [t for w in windows for t in (w.prefix_ids + w.suffix_ids)[3:9]]  # positions P-1 .. P+S-2
    expected = direct_band_means(model.embed.weight[counted], bases["mlp"].U_A)
    torch.testing.assert_close([b.memorized for b in result.targets[0].kfac], expected)


def test_task_families_report_their_bottom_band_share(tmp_path):
    model, target, bases, windows, clean = planted_world()
    families = {"sharp": clean, "flat": [w.prefix_ids + w.suffix_ids for w in windows]}
    shares = task_family_shares(model, [target], bases, families, {"sharp": 0.02, "flat": 0.4},
                                BandOptions(progress=False))
    by_name = {s.family: s for s in shares}
    per_vector = (model.embed.weight[200:] @ bases["mlp"].U_A).abs().mean(dim=0)
    assert by_name["flat"].bottom_share == pytest.approx(float(per_vector[10:].sum() / per_vector.sum()))
    assert by_name["flat"].bottom_share > 0.5 > by_name["sharp"].bottom_share
    assert by_name["flat"].accuracy_drop == 0.4
    paths = write_task_families(shares, tmp_path)
    assert [p.name for p in paths] == ["families.json", "families.png"]
    with pytest.raises(AnalysisError, match="unknown families"):
        task_family_shares(model, [target], bases, families, {"math": 0.3}, BandOptions(progress=False))


def test_missing_data_and_bases_are_refused():
    model, target, bases, windows, clean = planted_world()
    with pytest.raises(AnalysisError, match="no memorized window"):
        band_analysis(model, [target], bases, [], clean, BandOptions(progress=False))
    with pytest.raises(AnalysisError, match="clean set is empty"):
        band_analysis(model, [target], bases, windows, [], BandOptions(progress=False))
    with pytest.raises(AnalysisError, match="no eigenbasis"):
        band_analysis(model, [target], {}, windows, clean, BandOptions(progress=False))


def test_cli_analyze(tmp_path, lm_dir, text_jsonl):
    runner = CliRunner()
    factors = tmp_path / "factors"
    assert runner.invoke(app, ["collect", "--model", str(lm_dir), "--data", str(text_jsonl), "--out", str(factors),
                               "--seq-len", "16", "--no-progress"]).exit_code == 0
    memorized = tmp_path / "mem.jsonl"
    memorized.write_text(json.dumps({"prefix": "the quick brown", "suffix": " fox jumps"}) + "\n")
    prompts = tmp_path / "family.jsonl"
    prompts.write_text(json.dumps({"text": "hello world"}) + "\n" + json.dumps({"text": "again"}) + "\n")
    drops = tmp_path / "drops.json"
    drops.write_text(json.dumps({"greetings": 0.1}))
    out = tmp_path / "analysis"
    result = runner.invoke(app, ["analyze", "--model", str(lm_dir), "--factors", str(factors), "--memorized",
                                 str(memorized), "--clean", str(text_jsonl), "--clean-seq-len", "16", "--out", str(out),
                                 "--family", f"greetings={prompts}", "--drops", str(drops), "--no-progress"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "bands.json").read_text())
    assert [t["name"] for t in data["targets"]] == ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj",
                                                    "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
    assert [b["band"] for b in data["targets"][0]["kfac"]] == ["0-10%", "10-25%", "25-50%", "50-100%"]
    assert data["memorized_positions"] == 10  # the suffix " fox jumps"
    assert {p.name for p in out.iterdir()} == {"bands.json", "bands_layer0.png", "bands_layer1.png",
                                               "families.json", "families.png"}
    families = json.loads((out / "families.json").read_text())
    assert families[0]["family"] == "greetings" and families[0]["accuracy_drop"] == 0.1
