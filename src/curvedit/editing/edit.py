"""The edit: express each target weight in its curvature eigenbasis, keep a selection of
components, write it back; plus the controls that share the same plan shape.

Methods:
- "kfac": keep the components of highest curvature mass (`rho` of the mass, or a
  `keep_fraction` of the components by count): `W' = U_G ((U_G^T W U_A) * M) U_A^T`.
- "lowest": keep as many components as "kfac" would, but those of *lowest* mass.
- "random": keep as many components as "kfac" would, chosen uniformly at random (seeded).
- "svd": data-free truncation of W: keep the top singular values, `rho` of the squared
  singular-value energy or a `keep_fraction` of their count.
- "identity": the standard basis (A = I, G = I): components are weight entries; with masses
  "saliency" the edit is magnitude pruning.
- "noise": the components "kfac" would remove get Gaussian noise of the same Frobenius norm
  instead of being zeroed (`noise_in_block`; seeded): is it the direction or the size of the
  change that costs?
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from curvedit import __version__
from curvedit.editing.protect import attach_protect_masses, protect_mask
from curvedit.editing.settings import BASIS_METHODS, EIGENBASIS_METHODS, EditError, EditSettings
from curvedit.editing.targeted import attach_forget_masses, forget_masses, general_masses, targeted_mask
from curvedit.io import write_json
from curvedit.kfac.factors import check_factors_match, load_factors, without_eigencorrections
from curvedit.kfac.spectrum import (
    Eigenbasis,
    SelectionError,
    identity_bases,
    load_bases,
    mass_fraction,
    select_by_count,
    select_by_mass,
    select_by_masses,
    staircase,
    staircase_mask,
)
from curvedit.kfac.targets import Target


@dataclass(frozen=True)
class EditRule:
    """How much to keep for the targets whose name matches `pattern`.

    Attributes:
        pattern: glob on target names (or `re:REGEX`, searched); "*" matches all.
        rho: fraction of curvature mass (kfac/lowest/random) or of squared singular-value
            energy (svd) to keep, in (0, 1].
        keep_fraction: fraction of components (or singular values) to keep by count, in
            (0, 1]; used instead of rho when set.
        side: "G" or "A": keep only whole output (G) or input (A) eigendirections, the top ones
            by eigenvalue, `rho` of that side's eigenvalue mass or a `keep_fraction` of them
            (None: components, the paper's edit).
        block: (p, q) in (0, 1]: instead of an amount, remove the flattest block, the last
            `round(p * d_out)` G directions times the last `round(q * d_in)` A directions.
    """

    pattern: str = "*"
    rho: float | None = None
    keep_fraction: float | None = None
    side: str | None = None
    block: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        """Check the amount, side and block of the rule."""
        if self.block is not None:
            if self.rho is not None or self.keep_fraction is not None or self.side is not None:
                raise EditError(f"rule {self.pattern!r}: a block deletion takes no rho, keep_fraction or side")
            if len(self.block) != 2 or not all(0 < v <= 1 for v in self.block):
                raise EditError(f"rule {self.pattern!r}: block must be two shares in (0, 1], got {self.block}")
            object.__setattr__(self, "block", tuple(float(v) for v in self.block))
            return
        if self.side not in (None, "G", "A"):
            raise EditError(f"rule {self.pattern!r}: side must be 'G' or 'A', got {self.side!r}")
        if (self.rho is None) == (self.keep_fraction is None):
            raise EditError(f"rule {self.pattern!r}: give exactly one of rho and keep_fraction")
        value = self.rho if self.rho is not None else self.keep_fraction
        if not 0 < value <= 1:
            raise EditError(f"rule {self.pattern!r}: {'rho' if self.rho is not None else 'keep_fraction'} "
                            f"must be in (0, 1], got {value}")

    def matches(self, name: str) -> bool:
        """Whether the rule's pattern (a glob, or `re:REGEX` searched) matches target `name`."""
        if self.pattern.startswith("re:"):
            return re.search(self.pattern[3:], name) is not None
        return fnmatch.fnmatchcase(name, self.pattern)


@dataclass
class EditPlan:
    """How the edit is made, and per target pattern how much to keep (first matching rule wins).

    Attributes:
        rules: the rules, in priority order.
        settings: method, masses, seed, dtypes and device (`curvedit.editing.settings.EditSettings`).
        protect: the amount of the protect selection (its pattern is ignored) for bases that
            carry protect masses (`curvedit.editing.protect`); None: each target's own rule.
    """

    rules: list[EditRule]
    settings: EditSettings = field(default_factory=EditSettings)
    protect: EditRule | None = None

    def __post_init__(self) -> None:
        """Check the plan (`validate`)."""
        self.validate()

    def validate(self) -> None:
        """Raise EditError for a plan without rules, bad settings, or shaped rules (side or
        block) with a method or masses that do not select K-FAC eigendirections."""
        if not isinstance(self.settings, EditSettings):
            raise EditError(f"settings must be an EditSettings, got {type(self.settings).__name__}")
        self.settings.validate()
        if not self.rules:
            raise EditError("an edit plan needs at least one rule")
        shaped = [r for r in self.rules if r.side is not None or r.block is not None]
        if shaped and (self.settings.method not in EIGENBASIS_METHODS or self.settings.masses != "kfac"):
            raise EditError("side-restricted and block edits select K-FAC eigendirections: they need method kfac "
                            "(or its controls noise / random / lowest) and masses kfac")

    def rule_for(self, name: str) -> EditRule:
        """The first rule matching `name`.

        Raises:
            EditError: no rule matches.
        """
        for rule in self.rules:
            if rule.matches(name):
                return rule
        raise EditError(f"no rule of the plan matches target {name} (patterns: {[r.pattern for r in self.rules]})")

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON (the form `from_json` reads back)."""
        s = self.settings
        return {"method": s.method, "seed": s.seed, "compute_dtype": s.compute_dtype, "masses": s.masses,
                "rules": [asdict(r) for r in self.rules],
                **({"protect": asdict(self.protect)} if self.protect is not None else {})}

    @classmethod
    def from_json(cls, path: str | Path, **given: Any) -> "EditPlan":
        """Read a plan: `{"rules": [{"pattern": "*.up_proj", "rho": 0.6}, ...], "method": ...}`
        or the short form `{"*.up_proj": 0.6, "*.gate_proj": 0.6}` (pattern -> rho).

        Args:
            path: the JSON file.
            given: `method`, `seed`, `compute_dtype`, `masses` given elsewhere (the command line);
                None values are ignored. The plan's own value wins where only it gives
                one; a value given both ways must agree.

        Raises:
            EditError: unreadable JSON, an unknown key, a malformed rule, or a value the
                plan and `given` disagree on.
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise EditError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(data, dict) or not data:
            raise EditError(f"{path}: a plan is a JSON object: {{\"rules\": [...]}} or {{pattern: rho, ...}}")
        if "rules" not in data:
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data.values()):
                raise EditError(f"{path}: the short form maps patterns to rho values (numbers)")
            data = {"rules": [{"pattern": k, "rho": v} for k, v in data.items()]}
        unknown = set(data) - {"rules", "method", "seed", "compute_dtype", "masses", "protect"}
        if unknown:
            raise EditError(f"{path}: unknown key(s) {sorted(unknown)}")
        if not isinstance(data["rules"], list) or not all(isinstance(r, dict) for r in data["rules"]):
            raise EditError(f"{path}: 'rules' must be a list of objects")
        try:
            rules = [EditRule(**r) for r in data.pop("rules")]
            if data.get("protect") is not None:  # a manifest's plan reads back
                data["protect"] = EditRule(**data["protect"])
        except TypeError as err:
            raise EditError(f"{path}: malformed rule ({err})") from None
        for key, value in given.items():
            if value is None:
                continue
            if key in data and data[key] != value:
                raise EditError(f"{path} sets {key}={data[key]!r} but {value!r} was also given: give it once")
            data[key] = value
        protect = data.pop("protect", None)
        return cls(rules=rules, settings=EditSettings(**data), protect=protect)


@dataclass
class TargetEditStats:
    """What the edit did to one target.

    Attributes:
        name: target name.
        kept: components (singular values for svd) kept.
        total: components in all.
        mass_kept: share of curvature mass kept (svd: share of squared singular-value energy).
        rel_change: `||W' - W||_F / ||W||_F`.
        rule: the rule applied.
    """

    name: str
    kept: int
    total: int
    mass_kept: float
    rel_change: float
    rule: dict[str, Any] = field(default_factory=dict)


@dataclass
class AppliedEdit:
    """An edit applied in memory, with what is needed to undo it exactly.

    Attributes:
        plan: the plan applied.
        stats: per-target statistics, in target order.
        originals: target name -> the original weight tensor (a clone, stored layout/dtype).
    """

    plan: EditPlan
    stats: list[TargetEditStats]
    originals: dict[str, torch.Tensor]
    targets: list[Target]

    @torch.no_grad()
    def undo(self) -> None:
        """Restore every edited weight bit for bit."""
        for target in self.targets:
            target.module.weight.copy_(self.originals[target.name])


def change_basis_and_mask(weight_oi: torch.Tensor, basis: Eigenbasis, mask: torch.Tensor) -> torch.Tensor:
    """`U_G ((U_G^T W U_A) * M) U_A^T` in the basis' dtype/device.

    Args:
        weight_oi: `(d_out, d_in)` weight.
        basis: eigenbasis of the target's factors.
        mask: `(d_out, d_in)` bool, True = keep component (i, j).

    Returns:
        The edited `(d_out, d_in)` weight.
    """
    u_g, u_a = basis.U_G, basis.U_A
    coeffs = u_g.T @ weight_oi.to(u_g) @ u_a
    return u_g @ (coeffs * mask) @ u_a.T


def noise_in_block(weight_oi: torch.Tensor, basis: Eigenbasis, mask: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
    """The `noise` control: instead of zeroing the components the selection removes (`~mask`),
    add Gaussian noise to exactly those coefficients, scaled to the Frobenius norm the K-FAC
    edit would remove there: `W + U_G (N * ~M) U_A^T` with `||N * ~M|| = ||C * ~M||`, so the
    weight moves as far as under the edit, in the same block of the eigenbasis (seeded).

    Returns:
        The perturbed `(d_out, d_in)` weight.
    """
    u_g, u_a = basis.U_G, basis.U_A
    coeffs = u_g.T @ weight_oi.to(u_g) @ u_a
    removed = ~mask
    noise = torch.randn(coeffs.shape, generator=generator, dtype=torch.float64).to(coeffs) * removed
    target_norm, noise_norm = torch.linalg.norm(coeffs * removed), torch.linalg.norm(noise)
    scaled = noise * (target_norm / noise_norm) if float(noise_norm) > 0 else noise
    return u_g @ (coeffs + scaled) @ u_a.T


def kfac_mask(basis: Eigenbasis, rule: EditRule, masses: str = "kfac", protect: EditRule | None = None,
              weight_oi: torch.Tensor | None = None) -> torch.Tensor:
    """The curvature selection for a rule: top mass (`rho`) or top count (`keep_fraction`),
    ranked by the K-FAC products `lam_i * mu_j` or (masses "ekfac") by the basis' `S`; when
    the basis carries protect masses, united with the top protect mass at `protect`'s amount
    (default: the rule's own; `curvedit.editing.protect`).

    Raises:
        EditError: masses "ekfac" and the basis holds no `S`, or "saliency" without the weight.
    """
    mask = shaped_mask(basis, rule) if rule.side is not None or rule.block is not None else _general_mask(
        basis, rule, masses, weight_oi)
    if basis.protect is not None:
        amount = protect or rule
        mask = mask | protect_mask(*basis.protect, amount.rho, amount.keep_fraction)
    return mask


def _top_count(values: torch.Tensor, rho: float | None, keep_fraction: float | None) -> int:
    """How many of the (descending) values to keep: the fewest reaching `rho` of their sum, or
    `round(keep_fraction * n)`, at least one."""
    if keep_fraction is not None:
        return max(1, round(keep_fraction * values.shape[0]))
    cumulative = values.double().cumsum(0)
    return max(1, int(torch.searchsorted(cumulative, rho * float(cumulative[-1]) * (1 - 1e-12)).item()) + 1)


def shaped_mask(basis: Eigenbasis, rule: EditRule) -> torch.Tensor:
    """The selections of whole eigendirections: a side restriction (keep the top G or A
    directions, every component along them) or a block deletion (remove the flattest block)."""
    m, n = basis.lam.shape[0], basis.mu.shape[0]
    mask = torch.zeros(m, n, dtype=torch.bool, device=basis.lam.device)
    if rule.block is not None:
        rows, cols = round(rule.block[0] * m), round(rule.block[1] * n)
        mask[:] = True
        mask[m - rows:, n - cols:] = False
    elif rule.side == "G":
        mask[:min(m, _top_count(basis.lam, rule.rho, rule.keep_fraction)), :] = True
    else:
        mask[:, :min(n, _top_count(basis.mu, rule.rho, rule.keep_fraction))] = True
    if not bool(mask.any()):
        raise SelectionError(f"block {rule.block} removes every component of a {m} x {n} weight")
    return mask


def saliency_masses(basis: Eigenbasis, weight_oi: torch.Tensor) -> torch.Tensor:
    """`lam_i mu_j C_ij^2` with `C = U_G^T W U_A`: the curvature cost of removing each component."""
    coeffs = basis.U_G.T @ weight_oi.to(basis.U_G) @ basis.U_A
    return basis.lam[:, None] * basis.mu[None, :] * coeffs ** 2


def _general_mask(basis: Eigenbasis, rule: EditRule, masses: str, weight_oi: torch.Tensor | None) -> torch.Tensor:
    if masses == "saliency":
        if weight_oi is None:
            raise EditError("masses 'saliency' rank the weight's own coefficients: give the weight")
        return select_by_masses(saliency_masses(basis, weight_oi), rule.rho, rule.keep_fraction)
    if masses == "ekfac":
        if basis.S is None:
            raise EditError("masses 'ekfac' need eigenvalue-corrected factors: run collect --eigencorrect")
        return select_by_masses(basis.S, rule.rho, rule.keep_fraction)
    if masses == "targeted":
        if basis.forget is None:
            raise EditError("masses 'targeted' need a forget set's masses (edit --forget, curvedit.editing.targeted)")
        return targeted_mask(basis.forget, general_masses(basis), rule.rho, rule.keep_fraction)
    if rule.rho is not None:
        return select_by_mass(basis.lam, basis.mu, rule.rho)
    return select_by_count(basis.lam, basis.mu, rule.keep_fraction)


def kept_mass(basis: Eigenbasis, mask: torch.Tensor, masses: str = "kfac") -> float:
    """Share of the total mass (K-FAC products, or `S` for "ekfac" and, when present, for
    "targeted") the mask keeps."""
    if masses in ("ekfac", "targeted") and basis.S is not None:
        total = float(basis.S.double().sum())
        return float(basis.S.double()[mask].sum()) / total if total else 0.0
    return mass_fraction(basis.lam, basis.mu, mask)


def control_mask(basis: Eigenbasis, kept: int, method: str, generator: torch.Generator) -> torch.Tensor:
    """A control selection with `kept` components: "lowest" mass, or "random"."""
    m, n = basis.lam.shape[0], basis.mu.shape[0]
    if method == "lowest":
        return ~staircase_mask(staircase(basis.lam, basis.mu, m * n - kept, "count"), n)
    chosen = torch.randperm(m * n, generator=generator)[:kept]
    mask = torch.zeros(m * n, dtype=torch.bool)
    mask[chosen] = True
    return mask.view(m, n).to(basis.lam.device)


def svd_truncate(weight_oi: torch.Tensor, rule: EditRule) -> tuple[torch.Tensor, int, int, float]:
    """Keep the top singular values of W: `rho` of the energy `sum s^2`, or a count fraction.

    Returns:
        (edited weight, kept, total, energy share kept).
    """
    u, s, vh = torch.linalg.svd(weight_oi, full_matrices=False)
    energy = s.double() ** 2
    total = s.numel()
    if rule.rho is not None:
        cum = energy.cumsum(0)
        kept = total if rule.rho == 1 else int((cum < rule.rho * float(energy.sum())).sum()) + 1
    else:
        kept = round(rule.keep_fraction * total)
    kept = min(kept, total)
    if kept == 0:
        raise SelectionError(f"keep fraction {rule.keep_fraction} keeps no singular value of {total} (the edit would "
                             "zero the weight)")
    edited = (u[:, :kept] * s[:kept]) @ vh[:kept]
    return edited, kept, total, float(energy[:kept].sum() / energy.sum()) if energy.sum() > 0 else 0.0


@torch.no_grad()
def apply_edit(targets: list[Target], plan: EditPlan, bases: dict[str, Eigenbasis] | None = None) -> AppliedEdit:
    """Edit the target weights in place, per the plan; returns what undoes it.

    Args:
        targets: the weights to edit (from `select_targets`).
        plan: method and per-pattern amounts; its settings' device is where the linear algebra
            runs (None: the weight's device).
        bases: name -> eigenbasis (from `cached_eigenbases`); needed for every method but svd.

    Returns:
        An `AppliedEdit` with per-target stats and the originals.

    Raises:
        EditError: a target without eigenbasis, or no matching rule.
        SelectionError: an invalid rho/keep fraction.
    """
    settings = plan.settings
    dtype = getattr(torch, settings.compute_dtype)
    generator = torch.Generator().manual_seed(settings.seed)
    originals: dict[str, torch.Tensor] = {}
    stats: list[TargetEditStats] = []
    done: list[Target] = []
    try:
        for target in targets:
            rule = plan.rule_for(target.name)
            weight = target.weight_oi().to(device=settings.device or target.module.weight.device, dtype=dtype)
            if settings.method == "svd":
                edited, kept, total, mass = svd_truncate(weight, rule)
            else:
                if bases is None or target.name not in bases:
                    raise EditError(f"{target.name}: no eigenbasis (factors) for method {settings.method!r}")
                basis = bases[target.name].to(weight.device, dtype)
                mask = kfac_mask(basis, rule, settings.masses, plan.protect, weight)
                if settings.method not in BASIS_METHODS:
                    mask = control_mask(basis, int(mask.sum()), settings.method, generator)
                edited = (noise_in_block(weight, basis, mask, generator) if settings.method == "noise"
                          else change_basis_and_mask(weight, basis, mask))
                kept, total, mass = int(mask.sum()), mask.numel(), kept_mass(basis, mask, settings.masses)
            rel = float(torch.linalg.norm(edited - weight) / torch.linalg.norm(weight).clamp(min=1e-30))
            originals[target.name] = target.module.weight.detach().clone()
            target.set_weight_oi(edited)
            done.append(target)
            stats.append(TargetEditStats(name=target.name, kept=kept, total=total, mass_kept=mass,
                                         rel_change=rel, rule=asdict(rule)))
    except (EditError, SelectionError):
        AppliedEdit(plan, stats, originals, done).undo()
        raise
    return AppliedEdit(plan=plan, stats=stats, originals=originals, targets=done)


MANIFEST_FILE = "curvedit-edit.json"


def edit_model(model: nn.Module, targets: list[Target], plan: EditPlan, factor_dir: str | Path | None = None,
               *, forget: Sequence[Any] | None = None, pad_id: int = 0, protect_dir: str | Path | None = None
               ) -> AppliedEdit:
    """Check the factors against the model, get the (cached) eigenbases, apply the plan.

    Args:
        model: the unedited model (factors must come from these weights).
        targets: the weights to edit; each needs factors in `factor_dir` (unless svd).
        plan: the edit plan (its settings say the method, the device and the eigh precision).
        factor_dir: the factor directory (not needed for svd).
        forget: the forget set's windows (`curvedit.evaluate.windows.Window`) for masses "targeted".
        pad_id: padding id of the forget pass.
        protect_dir: a factor folder collected (from this model) on a population to keep:
            components in its top mass are kept too (`curvedit.editing.protect`).

    Returns:
        The `AppliedEdit` (call `.undo()` to restore the model).

    Raises:
        FactorError: factors of another model, or missing for a target.
        EditError: factors missing for a method that needs them, or a target no rule matches.
        SelectionError: a keep fraction that keeps no component of a target.
    """
    settings = plan.settings
    for target in targets:  # before any eigendecomposition is computed or cached
        rule = plan.rule_for(target.name)
        d_out, d_in = target.shape_oi
        size = min(d_out, d_in) if settings.method == "svd" else d_out * d_in
        if rule.keep_fraction is not None and round(rule.keep_fraction * size) == 0:
            raise SelectionError(f"{target.name}: keep fraction {rule.keep_fraction} keeps no component of {size} "
                                 "(the edit would zero the weight)")
    if settings.masses == "ekfac" and settings.method in EIGENBASIS_METHODS and factor_dir is not None:
        missing = without_eigencorrections(factor_dir, [t.name for t in targets])
        if missing:
            raise EditError(f"masses 'ekfac' need eigenvalue-corrected factors, and {factor_dir} has none for "
                            f"{missing[0]}{' and others' if len(missing) > 1 else ''}: run collect --eigencorrect")
    bases = method_bases(model, targets, factor_dir, settings, forget=forget, pad_id=pad_id, protect_dir=protect_dir)
    return apply_edit(targets, plan, bases)


def method_bases(model: nn.Module, targets: list[Target], factor_dir: str | Path | None,
                 settings: EditSettings | None = None, *, forget: Sequence[Any] | None = None, pad_id: int = 0,
                 protect_dir: str | Path | None = None) -> dict[str, Eigenbasis] | None:
    """The bases a method edits in: none for "svd", the standard basis for "identity", else the
    factors' eigenbases with what the ranking needs (`prepare_bases`).

    Args:
        model: the unedited model.
        targets: the weights to edit.
        factor_dir: the factor directory (None only for "svd" and "identity").
        settings: the method, masses, device and eigh precision (None: the defaults).
        forget: the forget set's windows, for masses "targeted".
        pad_id: padding id of the forget pass.
        protect_dir: protect factors (`curvedit.editing.protect`).

    Returns:
        name -> eigenbasis, or None for "svd".

    Raises:
        EditError: protect factors for a method that does not select eigenbasis components, or
            no factor directory for a method that needs one.
        FactorError: as `prepare_bases`.
    """
    settings = settings or EditSettings()
    method = settings.method
    if protect_dir is not None and method not in EIGENBASIS_METHODS:
        raise EditError(f"protection keeps components of the K-FAC eigenbasis: it does not apply to method "
                        f"{method!r}")
    if method == "svd":
        return None
    if method == "identity":
        return identity_bases(targets)
    if factor_dir is None:
        raise EditError(f"method {method!r} needs a factor directory")
    return prepare_bases(model, targets, factor_dir, settings, forget=forget, pad_id=pad_id, protect_dir=protect_dir)


def prepare_bases(model: nn.Module, targets: list[Target], factor_dir: str | Path,
                  settings: EditSettings | None = None, *, forget: Sequence[Any] | None = None, pad_id: int = 0,
                  protect_dir: str | Path | None = None) -> dict[str, Eigenbasis]:
    """The targets' (cached) eigenbases, checked against the model, with what the plan's
    ranking needs attached: a forget set's masses ("targeted") and a protected population's
    masses (`protect_dir`, a factor folder collected on it from the same model).

    Raises:
        FactorError: factors (or protect factors) of another model, or missing for a target.
        EditError: masses "targeted" without a forget set.
    """
    protect = None
    if protect_dir is not None:  # checked before any eigenbasis is computed or cached
        protect = load_factors(protect_dir)
        check_factors_match(protect, targets)
    settings = settings or EditSettings()
    masses = settings.masses
    if masses == "targeted" and not forget:
        raise EditError("masses 'targeted' need a forget set (edit --forget mem.jsonl)")
    bases = load_bases(targets, factor_dir, settings.device, settings.eigh_precision)
    if masses == "targeted":
        attach_forget_masses(bases, forget_masses(model, forget, targets, bases, pad_id=pad_id))
    if protect is not None:
        attach_protect_masses(bases, protect)
    return bases


def edit_manifest(applied: AppliedEdit, model_name: str, factor_dir: str | Path | None, *,
                  model_source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON description of an edit: plan, factor identity, eigh precision, per-target
    statistics, and the model's non-HF origin (`LoadedModel.source`, e.g. a GGUF file and its
    quantization) as `model_source`, null for an HF checkpoint."""
    factors_info: dict[str, Any] | None = None
    if factor_dir is not None and (Path(factor_dir) / "factors.json").is_file():
        meta = json.loads((Path(factor_dir) / "factors.json").read_text())
        factors_info = {"path": str(factor_dir), "model": meta.get("model"), "collection": meta.get("collection")}
    return {
        "curvedit_version": __version__,
        "model": model_name,
        "model_source": model_source,
        "plan": applied.plan.to_dict(),
        "factors": factors_info,
        "eigh_precision": applied.plan.settings.eigh_precision,
        "targets": {s.name: {k: v for k, v in asdict(s).items() if k != "name"} for s in applied.stats},
    }


def save_edited_model(model: nn.Module, preprocessor: Any | None, out: str | Path, manifest: dict[str, Any],
                      source: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write a complete HF model directory (weights, config, tokenizer/processor) plus
    `curvedit-edit.json`.

    Raises:
        EditError: `out` is the source model's directory, or exists and `overwrite` is False.
    """
    out_path = Path(out)
    if source is not None and Path(source).exists() and out_path.resolve() == Path(source).resolve():
        raise EditError(f"refusing to write the edited model into the input model's directory {source}")
    if out_path.exists() and any(out_path.iterdir()) and not overwrite:
        raise EditError(f"{out_path} exists and is not empty; pass --overwrite to replace it")
    model.save_pretrained(out_path)
    if preprocessor is not None:
        preprocessor.save_pretrained(out_path)
    write_json(out_path / MANIFEST_FILE, manifest)
    return out_path
