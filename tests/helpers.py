"""Helpers several test modules share: an interrupted batch stream, brute-force per-position
gradients, and factors collected on disk (through the API or the CLI)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from curvedit.cli import app
from curvedit.data import pad_batch
from curvedit.kfac.collect import CollectOptions, collect_factors
from curvedit.kfac.factors import save_factors
from curvedit.kfac.targets import TargetSpec, select_targets


class Interrupt(Exception):
    """Stands for a crash in the middle of a collection run."""


def interrupted(batches, after):
    """The batches, then a crash (`Interrupt`) when batch `after` would come."""
    for index, batch in enumerate(batches):
        if index == after:
            raise Interrupt
        yield batch


def target_io(model, targets, ids, loss_of_logits):
    """One unbatched forward/backward: per target, its input x and the gradient of
    `loss_of_logits(logits)` with respect to its output, both `(T, d)` (the brute-force side
    of the factor tests)."""
    store = {}
    hooks = [t.module.register_forward_hook(lambda m, i, o, n=t.name: store.__setitem__(n, (i[0], o)))
             for t in targets]
    for t in targets:
        t.module.weight.requires_grad_(True)
    try:
        logits = model(input_ids=ids).logits[0]
        for _, out in store.values():
            out.retain_grad()
        loss_of_logits(logits).backward()
    finally:
        for h in hooks:
            h.remove()
    return {name: (x[0], out.grad[0]) for name, (x, out) in store.items()}


def collected(tmp_path, model):
    """The model's K-FAC factors (mlp targets, sampled labels) on nine short sequences, saved
    to `tmp_path/factors`; returns (the folder, the targets)."""
    targets = select_targets(model, TargetSpec(preset="mlp"))
    seqs = [[1, 2, 3, 4, 5, 6, 7], [3, 4, 5, 6, 7, 8, 9], [2, 2, 7, 1, 9]] * 3
    factors = collect_factors(model, [pad_batch(seqs, 0)], targets, options=CollectOptions(progress=False))
    return save_factors(factors, tmp_path / "factors"), targets


def factors_and_windows(tmp_path, lm_dir, text_jsonl):
    """Factors collected through the CLI on the text corpus, and one memorized window."""
    factors = tmp_path / "factors"
    assert CliRunner().invoke(app, ["collect", "--model", str(lm_dir), "--data", str(text_jsonl), "--out",
                                    str(factors), "--seq-len", "16", "--no-progress"]).exit_code == 0
    memorized = tmp_path / "tune.jsonl"
    memorized.write_text(json.dumps({"prefix": "the quick brown", "suffix": " fox jumps"}) + "\n")
    return factors, memorized
