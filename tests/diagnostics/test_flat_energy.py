"""The flat-energy share: a sequence's input activation energy in the flattest directions of A."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from curvedit.cli import app
from curvedit.data import lm_batches
from curvedit.diagnostics.flat_energy import FlatEnergyError, flat_energy_by_group, flat_energy_shares
from curvedit.kfac.collect import CollectOptions, collect_factors
from curvedit.kfac.spectrum import eigenbasis
from curvedit.kfac.targets import TargetSpec, select_targets
from tests.tiny_models import tiny_gpt2


def tiny_bases(factor_ids: list[list[int]]) -> tuple:
    """A tiny GPT-2, its mlp-in targets and their eigenbases from factors on `factor_ids` (one batch)."""
    model = tiny_gpt2(vocab=11)
    targets = select_targets(model, TargetSpec(preset="mlp-in"))
    factors = collect_factors(model, lm_batches(factor_ids, len(factor_ids), 0), targets,
                              options=CollectOptions(progress=False))
    return model, targets, {t.name: eigenbasis(factors.targets[t.name]) for t in targets}


def test_the_share_equals_a_per_sequence_brute_force_and_does_not_depend_on_batching():
    ids = torch.randint(1, 11, (8, 9), generator=torch.Generator().manual_seed(0)).tolist()
    model, targets, bases = tiny_bases(ids[:5])
    sequences = [ids[5][:7], ids[6], ids[7][:4]]
    got = flat_energy_shares(model, targets, bases, sequences, flat_fraction=0.25, batch_size=2)
    for seq, share in zip(sequences, got):
        inputs = {}
        hooks = [t.module.register_forward_hook(lambda m, i, o, n=t.name, inputs=inputs: inputs.__setitem__(
            n, i[0][0].double()))
                 for t in targets]
        with torch.no_grad():
            model(input_ids=torch.tensor([seq]))
        for h in hooks:
            h.remove()
        per_target = []
        for t in targets:
            u_a = bases[t.name].U_A
            k = round(0.25 * u_a.shape[1])
            flat = u_a[:, -k:]
            x = inputs[t.name]
            per_target.append(float(((x @ flat) ** 2).sum() / (x ** 2).sum()))
        assert share == pytest.approx(sum(per_target) / len(per_target), rel=1e-9)
    assert flat_energy_shares(model, targets, bases, sequences, flat_fraction=0.25, batch_size=1) == pytest.approx(got)
    assert 0 < min(got) <= max(got) < 1


@pytest.mark.parametrize("kwargs, message", [({"flat_fraction": 1.0}, "flat fraction"),
                                             ({"sequences": []}, "no sequence"),
                                             ({"spans": [(2, 2)]}, "no counted position")])
def test_bad_requests_are_refused(kwargs, message):
    model, targets, bases = tiny_bases([[1, 2, 3, 4]])
    args = {"sequences": [[1, 2, 3]], **kwargs}
    with pytest.raises(FlatEnergyError, match=message):
        flat_energy_shares(model, targets, bases, args.pop("sequences"), **args)


def test_shares_by_group_are_the_shares_of_one_pass_split_in_order():
    ids = torch.randint(1, 11, (9, 6), generator=torch.Generator().manual_seed(1)).tolist()
    model, targets, bases = tiny_bases(ids[:5])
    sequences, groups = ids[5:], ["b", "a", "b", "c"]
    every = flat_energy_shares(model, targets, bases, sequences, batch_size=3)
    split = flat_energy_by_group(model, targets, bases, sequences, groups, batch_size=3)
    assert list(split) == ["b", "a", "c"]
    assert split == {"b": [every[0], every[2]], "a": [every[1]], "c": [every[3]]}
    with pytest.raises(FlatEnergyError, match="3 group names for 4 sequences"):
        flat_energy_by_group(model, targets, bases, sequences, groups[:3])


def test_cli_score_writes_one_score_per_sequence(tmp_path, lm_dir, text_jsonl):
    factors = tmp_path / "factors"
    assert CliRunner().invoke(app, ["collect", "--model", str(lm_dir), "--data", str(text_jsonl), "--out",
                                    str(factors), "--seq-len", "16", "--no-progress"]).exit_code == 0
    out = tmp_path / "scores.jsonl"
    result = CliRunner().invoke(app, ["score", "--model", str(lm_dir), "--factors", str(factors), "--data",
                                      str(text_jsonl), "--seq-len", "16", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(0 <= r["score"] <= 1 for r in rows) and [r["index"] for r in rows] == list(range(len(rows)))


def test_a_screen_keeping_99_percent_of_members_skips_the_non_members_below_its_threshold():
    from curvedit.diagnostics.flat_energy import screen_savings

    members = [0.1 * k for k in range(1, 101)]  # 0.1 .. 10.0: the 1% quantile (lower) is 0.1
    nonmembers = [0.05, 0.08, 0.1, 0.5, 7.0]
    assert screen_savings(members, nonmembers, 0.99) == pytest.approx(2 / 5)  # 0.05 and 0.08 fall below 0.1
    assert screen_savings(members, nonmembers, 0.5) == pytest.approx(4 / 5)  # below the median 5.0
    with pytest.raises(FlatEnergyError, match="member and non-member"):
        screen_savings([], nonmembers)


def test_score_separation_pairs_members_only_with_their_own_stratum_and_averages_the_screen():
    from curvedit.diagnostics.flat_energy import score_separation

    # each stratum alone separates perfectly, but stratum 2's members score below stratum 1's
    # non-members: pooled they would not, stratified they do
    strata = [([0.9, 0.8, 0.7], [0.5, 0.4]), ([0.3, 0.2], [0.1, 0.05, 0.0])]
    result = score_separation(strata)
    assert result["auroc"]["value"] == pytest.approx(1.0)
    assert result["skipped_at_99_recall"] == pytest.approx(1.0)  # below the least member in each stratum
    one = score_separation([([0.3, 0.9], [0.5, 0.1])])  # 3 of the 4 member/non-member pairs ordered right
    assert one["auroc"]["value"] == pytest.approx(0.75) and one["skipped_at_99_recall"] == pytest.approx(0.5)
    with pytest.raises(FlatEnergyError, match="every stratum"):
        score_separation([([0.1], [])])
