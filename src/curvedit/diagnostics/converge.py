"""How much data do the factors need (`curvedit converge`)?

Two factor sets of the same targets (fewer tokens vs more, sampled vs gold labels) are
compared by what matters for the edit: the components each keeps. For a rule (keep a share
of the components, or of the mass) let `K_a` be the components set `a` keeps, in its own
eigenbasis `u^a_i v^a_j^T`. The curvature of set `b` (`G_b ⊗ A_b`) puts the mass
`(u^a_i^T G_b u^a_i) (v^a_j^T A_b v^a_j)` on component `(i, j)` of `a`'s basis, so

    captured(a -> b) = sum over K_a of that mass  /  sum over K_b of lam^b_i mu^b_j

is the share of `b`'s own kept mass that `a`'s selection holds under `b`'s curvature: 1 when
the two select the same subspace, lower the more `a`'s choice misses what `b` would keep.
`b` is the reference (the larger collection). Per target, and its mean over targets.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from curvedit.data import lm_batches
from curvedit.editing.edit import EditPlan, EditRule, apply_edit, kfac_mask
from curvedit.io import write_json
from curvedit.kfac.collect import CollectOptions, collect_factors
from curvedit.kfac.factors import (
    FactorError,
    FactorSet,
    TargetFactors,
    check_factors_match,
    load_factors,
    model_identity,
    save_factors,
)
from curvedit.kfac.spectrum import Eigenbasis, eigenbasis
from curvedit.memorize.implant import model_weights_sha256
from curvedit.plots import pyplot, save_figure

KEY_FILE = "converge-key.json"  # what a budget folder's factors were collected from


def captured_mass(basis_a: Eigenbasis, factors_b: TargetFactors, basis_b: Eigenbasis, rule: EditRule) -> float:
    """`captured(a -> b)` of one target (module docstring).

    Args:
        basis_a: eigenbasis of the factors whose selection is judged.
        factors_b: the reference factors.
        basis_b: their eigenbasis.
        rule: the selection (`rho` or `keep_fraction`).

    Returns:
        The captured share (1.0 for identical factors).
    """
    g_diag = torch.einsum("oi,op,pi->i", basis_a.U_G, factors_b.G.to(basis_a.U_G), basis_a.U_G)
    a_diag = torch.einsum("ij,ik,kj->j", basis_a.U_A, factors_b.A.to(basis_a.U_A), basis_a.U_A)
    kept_a = kfac_mask(basis_a, rule)
    captured = float((g_diag[:, None] * a_diag[None, :])[kept_a].sum())
    kept_b = kfac_mask(basis_b, rule)
    own = float((basis_b.lam[:, None] * basis_b.mu[None, :])[kept_b].sum())
    return captured / own if own > 0 else 0.0


@dataclass
class Comparison:
    """`captured(a -> b)` per target and its mean.

    Attributes:
        per_target: target name -> captured share.
        mean: mean over targets.
        rule: the selection compared.
    """

    per_target: dict[str, float]
    mean: float
    rule: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"per_target": self.per_target, "mean": self.mean, "rule": self.rule}


def compare_factors(a: FactorSet, b: FactorSet, rule: EditRule,
                    bases: tuple[dict[str, Eigenbasis], dict[str, Eigenbasis]] | None = None) -> Comparison:
    """`captured(a -> b)` for every target the two sets share.

    Args:
        a: the factor set judged (e.g. fewer tokens).
        b: the reference (e.g. the most tokens).
        rule: the selection.
        bases: their eigenbases when already computed (else computed here, float64).

    Raises:
        FactorError: no shared target, or shared targets of different shapes or models.
    """
    if a.model.get("weights_hash") != b.model.get("weights_hash"):
        raise FactorError("the two factor sets were collected on different model weights")
    names = [n for n in b.targets if n in a.targets]
    if not names:
        raise FactorError("the two factor sets share no target")
    bases_a, bases_b = bases or ({n: eigenbasis(a.targets[n]) for n in names},
                                 {n: eigenbasis(b.targets[n]) for n in names})
    per_target = {}
    for name in names:
        if a.targets[name].A.shape != b.targets[name].A.shape or a.targets[name].G.shape != b.targets[name].G.shape:
            raise FactorError(f"{name}: the two factor sets have different shapes")
        per_target[name] = captured_mass(bases_a[name], b.targets[name], bases_b[name], rule)
    return Comparison(per_target=per_target, mean=sum(per_target.values()) / len(per_target),
                      rule={"rho": rule.rho, "keep_fraction": rule.keep_fraction})


@dataclass
class ConvergeOptions:
    """Settings of a convergence run.

    Attributes:
        budgets: token budgets, ascending; the last is the reference.
        rule: the selection compared (and applied for the edit's outcome).
        gold: also collect gold labels at the last budget and compare them with sampled ones.
        batch_size: sequences per collection batch.
        seed: label-sampling seed.
        progress: progress bars.
    """

    budgets: tuple[int, ...] = (10_000, 30_000, 100_000)
    rule: EditRule = field(default_factory=lambda: EditRule(keep_fraction=0.5))
    gold: bool = True
    batch_size: int = 8
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        """Raise FactorError for token budgets that are not positive and ascending, or a batch size below 1."""
        budgets = list(self.budgets)
        if not budgets or budgets != sorted(set(budgets)) or budgets[0] < 1:
            raise FactorError(f"token budgets must be positive and ascending, got {budgets}")
        if self.batch_size < 1:
            raise FactorError(f"batch_size must be at least 1, got {self.batch_size}")


def prefix_by_tokens(sequences: list[list[int]], budget: int) -> list[list[int]]:
    """The leading sequences holding `budget` tokens (the last one cut)."""
    taken, total = [], 0
    for seq in sequences:
        if total >= budget:
            break
        piece = seq[: budget - total]
        taken.append(piece)
        total += len(piece)
    return taken


def run_convergence(model: Any, sequences: list[list[int]], targets: list[Any], out: Any, options: ConvergeOptions,
                    evaluate: Any = None, pad_id: int = 0) -> dict[str, Any]:
    """Collect factors on nested prefixes of `sequences` (each budget's factors in
    `out/tokens-N`, read back only when that folder holds this run's own factors: same model
    weights, targets, data, labels, seed and batch size), compare each with the last budget's, and
    (with `evaluate`, a function model -> metrics) measure the edit made with each.

    Returns:
        `{"budgets": [...], "rows": [{"tokens", "captured" (mean), "per_target", **evaluate}],
        "gold": {"captured_gold_in_sampled", "captured_sampled_in_gold"} or None, "rule": ...}`.

    Raises:
        FactorError: budgets not ascending or data shorter than the last budget.
    """
    options.validate()
    budgets = list(options.budgets)
    available = sum(len(s) for s in sequences)
    if available < budgets[-1]:
        raise FactorError(f"the data holds {available} tokens, fewer than the largest budget {budgets[-1]}")
    out = Path(out)

    identity = {**model_identity(model, targets), "all_weights": model_weights_sha256(model)}

    def factors_for(budget: int, label_mode: str) -> FactorSet:
        """A budget's factors, read back only when the folder holds this very run's (same model
        weights, targets, data, labels, seed and batch size), else collected anew."""
        folder = out / (f"tokens-{budget}" if label_mode == "sampled" else f"gold-{budget}")
        data = prefix_by_tokens(sequences, budget)
        key = hashlib.sha256(json.dumps({"model": identity, "targets": [t.name for t in targets], "data": data,
                                         "labels": label_mode, "seed": options.seed,
                                         "batch": options.batch_size}, sort_keys=True).encode()).hexdigest()
        stamp = folder / KEY_FILE
        if (folder / "factors.safetensors").is_file() and stamp.is_file() and \
                json.loads(stamp.read_text()).get("key") == key:
            factors = load_factors(folder)
            check_factors_match(factors, targets)  # the checks `edit` makes
            return factors
        batches = lm_batches(data, options.batch_size, pad_id)
        factors = collect_factors(model, batches, targets, options=CollectOptions(
            label_mode=label_mode, seed=options.seed, progress=options.progress, total_tokens=budget,
            description=f"first {budget} tokens"))
        save_factors(factors, folder)
        write_json(stamp, {"key": key})
        return factors

    sets = {b: factors_for(b, "sampled") for b in budgets}
    names = [t.name for t in targets]
    bases = {b: {n: eigenbasis(s.targets[n]) for n in names} for b, s in sets.items()}
    reference = sets[budgets[-1]]
    rows = []
    for budget in budgets:
        comparison = compare_factors(sets[budget], reference, options.rule, (bases[budget], bases[budgets[-1]]))
        row: dict[str, Any] = {"tokens": budget, "captured": comparison.mean, "per_target": comparison.per_target}
        if evaluate is not None:
            applied = apply_edit(targets, EditPlan([options.rule]), bases[budget])
            try:
                row.update(evaluate(model))
            finally:
                applied.undo()
        rows.append(row)
    gold = None
    if options.gold:
        gold_set = factors_for(budgets[-1], "gold")
        gold_bases = {n: eigenbasis(gold_set.targets[n]) for n in names}
        gold = {"tokens": budgets[-1],
                "captured_gold_in_sampled": compare_factors(gold_set, reference, options.rule,
                                                            (gold_bases, bases[budgets[-1]])).mean,
                "captured_sampled_in_gold": compare_factors(reference, gold_set, options.rule,
                                                            (bases[budgets[-1]], gold_bases)).mean}
        if evaluate is not None:
            applied = apply_edit(targets, EditPlan([options.rule]), gold_bases)
            try:
                gold.update(evaluate(model))
            finally:
                applied.undo()
    return {"budgets": budgets, "rows": rows, "gold": gold,
            "rule": {"rho": options.rule.rho, "keep_fraction": options.rule.keep_fraction}}


def plot_convergence(result: dict[str, Any], path: Any) -> Any:
    """Captured share of the reference's kept mass (and, when measured, held-out recall and
    perplexity of the edit) against the tokens the factors saw."""
    plt = pyplot()
    rows = result["rows"]
    tokens = [r["tokens"] for r in rows]
    with_outcome = "loose" in rows[0]
    fig, axes = plt.subplots(1, 2 if with_outcome else 1, figsize=(10 if with_outcome else 5.5, 3.6), squeeze=False)
    ax = axes[0][0]
    ax.plot(tokens, [r["captured"] for r in rows], "-o", label="sampled labels")
    if result.get("gold"):
        ax.scatter([result["gold"]["tokens"]], [result["gold"]["captured_gold_in_sampled"]], marker="s", color="k",
                   label="gold labels (vs sampled)", zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("tokens in the factors")
    ax.set_ylabel(f"share of the {tokens[-1]}-token selection's mass")
    ax.set_title("does the selection converge?", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if with_outcome:
        ax = axes[0][1]
        ax.plot(tokens, [100 * r["loose"] for r in rows], "-o", color="tab:orange", label="held-out loose recall (%)")
        ax.set_xscale("log")
        ax.set_xlabel("tokens in the factors")
        ax.set_ylabel("held-out loose recall (%)")
        twin = ax.twinx()
        twin.plot(tokens, [r["perplexity"] for r in rows], "-s", color="tab:green", label="perplexity")
        twin.set_ylabel("perplexity")
        ax.set_title("the edit made with each", fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
