"""Eigenvalue-corrected K-FAC masses (EK-FAC, George et al. 2018): `collect --eigencorrect`.

K-FAC gives component `(i, j)` of a weight, in the eigenbasis `U_G`, `U_A` of its factors,
the curvature mass `lam_i * mu_j`: the product of the second moments of `u_i^T g` and of
`v_j^T x`, as if the two were independent. The eigenvalue-corrected estimate measures
the component's mass directly, over the same kind of positions:

    s_ij = E[(u_i^T g)^2 (v_j^T x)^2]

A second pass over data once the eigenbasis is known: per batch, rotate the counted
positions' output gradients and inputs (`g_rot = g U_G`, `x_rot = x U_A`) and add
`g_rot^2.T @ x_rot^2`, one GEMM per target (never an outer product per position). When
`g` and `x` are independent, `s_ij = lam_i * mu_j` exactly. The result is stored as
`NAME.S` in the factor file, with the SHA-256 of the eigenbasis it was measured in
(`basis_sha256`); `load_bases` attaches it to the eigenbasis only when that basis is the
one in use. Sampled labels are drawn per batch from (seed, batch index), as in the
K-FAC pass.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from curvedit.distributed import current_context, is_sharded_model, reduce_sums
from curvedit.kfac.collect import (
    ACCUMULATE_DTYPES,
    BatchSource,
    CollectError,
    CollectOptions,
    _batch_factory,
    _batch_tokens,
    _only_targets_require_grad,
    _rows,
    _to_device,
    batch_generator,
    no_tf32,
)
from curvedit.kfac.factors import FactorSet, TargetFactors, check_factors_match, load_factors, save_factors
from curvedit.kfac.objectives import CausalLMObjective, Objective
from curvedit.kfac.spectrum import Eigenbasis, basis_sha256, cached_eigenbases, refresh_eigenbasis_cache
from curvedit.kfac.targets import Target


def eigencorrection_sum(g_no: torch.Tensor, x_ni: torch.Tensor, basis: Eigenbasis) -> torch.Tensor:
    """`sum_n (g_n U_G)^2.T (x_n U_A)^2`: the positions' contribution to `n * S`.

    Args:
        g_no: `(n, d_out)` output gradients of counted positions.
        x_ni: `(n, d_in)` inputs of the same positions.
        basis: the target's eigenbasis (its dtype is the accumulation dtype).

    Returns:
        `(d_out, d_in)` sum over the positions of `(u_i^T g)^2 (v_j^T x)^2`.
    """
    g_rot = g_no.to(basis.U_G) @ basis.U_G
    x_rot = x_ni.to(basis.U_A) @ basis.U_A
    return g_rot.square().T @ x_rot.square()


@torch.no_grad()
def _accumulate(sums: dict[str, torch.Tensor], captured, grads, mask: torch.Tensor, bases: dict[str, Eigenbasis],
                index: int) -> None:
    for (target, x_in, _), g_out in zip(captured, grads):
        if g_out is None:
            continue  # a target whose output the loss does not depend on adds nothing
        x_ni = _rows(x_in, mask, target.name, "input")
        g_no = _rows(g_out, mask, target.name, "output gradient")
        if not (torch.isfinite(x_ni).all() and torch.isfinite(g_no).all()):
            raise CollectError(f"batch {index}: non-finite inputs or output gradients at {target.name} (NaN/inf)")
        sums[target.name].add_(eigencorrection_sum(g_no, x_ni, bases[target.name]))


def collect_eigencorrections(
    model: nn.Module,
    batches: BatchSource,
    targets: list[Target],
    bases: dict[str, Eigenbasis],
    objective: Objective | None = None,
    options: CollectOptions | None = None,
) -> dict[str, tuple[torch.Tensor, int]]:
    """One pass over the data accumulating `S` for every target (module docstring).

    Under `torch.distributed` (data parallel) batch `i` runs on rank `i % world_size` and the
    sums are all-reduced at the end; FSDP-sharded models are refused.

    Args:
        model: the model the factors and bases belong to.
        batches: batch dicts the objective understands (or a callable returning them).
        targets: the targets (each with a basis in `bases`).
        bases: name -> eigenbasis of the target's K-FAC factors.
        objective: default `CausalLMObjective(options.label_mode)`.
        options: label mode, seed, accumulate dtype, progress, total tokens.

    Returns:
        name -> (`S` as a float tensor on CPU in the accumulate dtype, positions averaged).

    Raises:
        CollectError: no data, non-finite values, a target without basis or positions, or
            an FSDP-sharded model.
    """
    options = options or CollectOptions()
    missing = [t.name for t in targets if t.name not in bases]
    if missing:
        raise CollectError(f"no eigenbasis for {missing[:3]}: collect the K-FAC factors first")
    if is_sharded_model(model):
        raise CollectError("--eigencorrect does not support FSDP-sharded models yet (data parallel works)")
    objective = objective or CausalLMObjective(options.label_mode)
    acc_dtype = ACCUMULATE_DTYPES[options.accumulate_dtype]
    device = next(model.parameters()).device
    ctx = current_context()
    local = {t.name: bases[t.name].to(device, acc_dtype) for t in targets}
    sums = {t.name: torch.zeros(t.shape_oi, dtype=acc_dtype, device=device) for t in targets}
    positions = {t.name: 0 for t in targets}
    captured: list[tuple[Target, torch.Tensor, torch.Tensor]] = []

    def make_hook(target: Target):
        def hook(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            captured.append((target, inputs[0].detach(), output))
        return hook

    handles = [t.module.register_forward_hook(make_hook(t)) for t in targets]
    bar = tqdm(total=options.total_tokens, unit="tok", unit_scale=True, desc="eigencorrect",
               disable=not (options.progress and ctx.is_main))
    walked = 0
    try:
        with _only_targets_require_grad(model, targets), no_tf32():
            batch_list: Iterable[dict] = _batch_factory(batches, 1)()
            for index, batch in enumerate(batch_list):
                walked = index + 1
                if not ctx.owns(index):
                    continue
                captured.clear()
                batch = _to_device(batch, device)
                out = objective(model, batch, batch_generator(options.seed, index, device))
                if not torch.isfinite(out.loss):
                    raise CollectError(f"batch {index}: the loss is {out.loss.item()} (NaN/inf)")
                counted = int(out.positions_mask.sum())
                if counted:
                    grads = torch.autograd.grad(out.loss, [o for _, _, o in captured], allow_unused=True)
                    _accumulate(sums, captured, grads, out.positions_mask, local, index)
                    for target, _, _ in captured:
                        positions[target.name] += counted
                captured.clear()
                bar.update(_batch_tokens(batch))
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
    names = [t.name for t in targets]
    reduced = reduce_sums([sums[n] for n in names], [positions[n] for n in names], walked, ctx, keep_on_all=True)
    if walked == 0:
        raise CollectError("no data: the batch iterator was empty")
    result = {}
    for name, count in zip(names, reduced):
        if count == 0:
            raise CollectError(f"{name}: no counted positions in the eigen-correction pass")
        result[name] = (sums[name].div_(count).cpu(), count)
    return result


def eigencorrect_factors(
    model: nn.Module,
    batches: BatchSource,
    targets: list[Target],
    factor_dir: str | Path,
    objective: Objective | None = None,
    options: CollectOptions | None = None,
) -> FactorSet:
    """Add eigenvalue-corrected masses to a factor directory, in place: compute (or read the
    cached) eigenbasis of each target's factors, run `collect_eigencorrections` and rewrite
    the factor file with `NAME.S` (the eigenbasis cache stays valid: A and G are unchanged).

    Args:
        model: the model the factors belong to (checked against their weight hashes).
        batches: data for the pass (the same kind as the K-FAC pass; it may be the same data).
        targets: the targets to correct (all must be in the factor file).
        factor_dir: the factor directory.
        objective: the objective (default: causal LM with `options.label_mode`).
        options: collection options (seed, label mode, dtype, progress).

    Returns:
        The factor set as written.

    Raises:
        curvedit.kfac.factors.FactorError: factors of another model or without these targets.
        CollectError: see `collect_eigencorrections`.
    """
    options = options or CollectOptions()
    factors = load_factors(factor_dir)
    check_factors_match(factors, targets)
    if factors.collection.get("label_mode") not in (None, options.label_mode):
        options = replace(options, label_mode=factors.collection["label_mode"])
    bases = cached_eigenbases(factor_dir, factors.targets, [t.name for t in targets])
    corrected = collect_eigencorrections(model, batches, targets, bases, objective, options)
    for name, (s_oi, count) in corrected.items():
        old: TargetFactors = factors.targets[name]
        factors.targets[name] = replace(old, S=s_oi, S_positions=count, S_basis_sha256=basis_sha256(bases[name]))
    factors.collection = {**factors.collection, "eigencorrected": {"seed": options.seed, "data": options.description}}
    if current_context().is_main:
        save_factors(factors, factor_dir)
        refresh_eigenbasis_cache(factor_dir)
    return factors
