"""K-FAC factor collection: hooks on the target modules and float32+ accumulators.

For each target `y = W x`, one pass over the data accumulates
`sum x x^T` and `sum g g^T` over the positions the objective counts, where `g` is the
gradient of the summed loss with respect to the target's output. Only those output
gradients are computed (`torch.autograd.grad` on the outputs): no parameter gradient is
formed or stored.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from curvedit.factors import FactorSet, TargetFactors, model_identity, weight_sha256
from curvedit.io import write_json, write_safetensors
from curvedit.objectives import LABEL_MODES, CausalLMObjective, Objective
from curvedit.targets import Target

ACCUMULATE_DTYPES = {"float32": torch.float32, "float64": torch.float64}
CHECKPOINT_TENSORS = "checkpoint.safetensors"
CHECKPOINT_META = "checkpoint.json"


class CollectError(RuntimeError):
    """Collection cannot produce trustworthy factors (no data, non-finite values, ...)."""


@dataclass
class CollectOptions:
    """Options of a collection run.

    Attributes:
        label_mode: "sampled" (labels drawn from the model: true Fisher) or "gold".
        accumulate_dtype: "float32" or "float64" accumulators, whatever the model dtype.
        seed: seed of the label sampler (runs are repeatable for a seed).
        checkpoint_dir: where to write checkpoints; None for no checkpoints.
        checkpoint_every: write a checkpoint every this many batches.
        resume: continue from the checkpoint in `checkpoint_dir` (skips the batches it
            covered; labels are drawn per batch from (seed, batch index), so they match).
        progress: show a progress bar (tokens/s, ETA when `total_tokens` is known).
        total_tokens: expected number of tokens, for the progress bar's ETA.
        description: a description of the data, stored with the factors.
        extra: more fields stored in the factors' `collection` metadata.
    """

    label_mode: str = "sampled"
    accumulate_dtype: str = "float32"
    seed: int = 0
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 50
    resume: bool = False
    progress: bool = True
    total_tokens: int | None = None
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Sums:
    a_sum: dict[str, torch.Tensor]
    g_sum: dict[str, torch.Tensor]
    positions: dict[str, int]
    batches_done: int = 0
    tokens_seen: int = 0


@contextlib.contextmanager
def _only_targets_require_grad(model: nn.Module, targets: list[Target]) -> Iterator[None]:
    """Within the block: eval mode, and only the target weights require grad (so autograd
    builds the graph from the first target on, and nothing else keeps gradient state)."""
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        model.eval()
        for p in flags:
            p.requires_grad_(False)
        for target in targets:
            target.module.weight.requires_grad_(True)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)


def _fingerprint(targets: list[Target], options: CollectOptions) -> dict[str, Any]:
    return {"targets": [t.name for t in targets], "label_mode": options.label_mode,
            "accumulate_dtype": options.accumulate_dtype, "seed": options.seed}


def _save_checkpoint(sums: _Sums, options: CollectOptions, targets: list[Target]) -> None:
    root = Path(options.checkpoint_dir)
    tensors = {f"{n}.A_sum": t for n, t in sums.a_sum.items()} | {f"{n}.G_sum": t for n, t in sums.g_sum.items()}
    write_safetensors(root / CHECKPOINT_TENSORS, tensors)
    write_json(root / CHECKPOINT_META, {
        "fingerprint": _fingerprint(targets, options),
        "positions": sums.positions,
        "batches_done": sums.batches_done,
        "tokens_seen": sums.tokens_seen,
    })


def _load_checkpoint(sums: _Sums, options: CollectOptions, targets: list[Target]) -> None:
    root = Path(options.checkpoint_dir)
    meta_path = root / CHECKPOINT_META
    if not meta_path.is_file():
        raise CollectError(f"--resume: no checkpoint in {root}")
    meta = json.loads(meta_path.read_text())
    if meta["fingerprint"] != _fingerprint(targets, options):
        raise CollectError(f"--resume: the checkpoint in {root} was made with other settings: "
                           f"{meta['fingerprint']} vs {_fingerprint(targets, options)}")
    tensors = load_file(str(root / CHECKPOINT_TENSORS))
    for name in sums.a_sum:
        sums.a_sum[name].copy_(tensors[f"{name}.A_sum"])
        sums.g_sum[name].copy_(tensors[f"{name}.G_sum"])
    sums.positions = {k: int(v) for k, v in meta["positions"].items()}
    sums.batches_done = meta["batches_done"]
    sums.tokens_seen = meta["tokens_seen"]


def batch_generator(seed: int, batch_index: int, device: torch.device) -> torch.Generator:
    """The label sampler of one batch, seeded by (seed, batch index): sampled labels do not
    depend on what ran before, so a resumed or sharded run draws the same labels."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + batch_index)


def _batch_tokens(batch: dict) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    first = next(iter(batch.values()))
    return int(first.shape[0] * (first.shape[1] if first.dim() > 1 else 1))


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _rows(tensor: torch.Tensor, mask: torch.Tensor, name: str, what: str) -> torch.Tensor:
    """Flatten a target's `(*S, d)` tensor to the `(n, d)` rows of counted positions."""
    if tuple(tensor.shape[:-1]) != tuple(mask.shape):
        raise CollectError(f"{name}: {what} has leading shape {tuple(tensor.shape[:-1])}, "
                           f"but the objective's positions mask is {tuple(mask.shape)}")
    return tensor[mask]


def collect_factors(
    model: nn.Module,
    batches: Iterable[dict],
    targets: list[Target],
    objective: Objective | None = None,
    options: CollectOptions | None = None,
    model_name: str | None = None,
) -> FactorSet:
    """Collect K-FAC factors `A = mean x x^T`, `G = mean g g^T` for each target.

    Args:
        model: the model (any dtype/device; its weights are not changed).
        batches: dicts of tensors the objective understands (`input_ids` and
            `attention_mask` for LMs, `pixel_values` for images). Must be deterministic
            across runs for `resume` to continue where it stopped.
        targets: from `select_targets`.
        objective: how a batch becomes a summed loss and a positions mask; default
            `CausalLMObjective(options.label_mode)`.
        options: `CollectOptions`.
        model_name: the name stored in the factor metadata.

    Returns:
        A `FactorSet` of means, with metadata.

    Raises:
        CollectError: no batches, a target without counted positions, NaN/inf in the loss,
            inputs or gradients (naming the batch and target), or a bad resume.
        ValueError: an unknown label mode or accumulate dtype.
    """
    options = options or CollectOptions()
    if options.label_mode not in LABEL_MODES:
        raise ValueError(f"unknown label mode {options.label_mode!r}; choose one of {LABEL_MODES}")
    if options.accumulate_dtype not in ACCUMULATE_DTYPES:
        raise ValueError(f"accumulate_dtype must be one of {sorted(ACCUMULATE_DTYPES)}")
    objective = objective or CausalLMObjective(options.label_mode)
    acc_dtype = ACCUMULATE_DTYPES[options.accumulate_dtype]
    device = next(model.parameters()).device
    sums = _Sums(
        a_sum={t.name: torch.zeros(t.shape_oi[1], t.shape_oi[1], dtype=acc_dtype, device=device) for t in targets},
        g_sum={t.name: torch.zeros(t.shape_oi[0], t.shape_oi[0], dtype=acc_dtype, device=device) for t in targets},
        positions={t.name: 0 for t in targets},
    )
    if options.resume:
        _load_checkpoint(sums, options, targets)

    captured: list[tuple[Target, torch.Tensor, torch.Tensor]] = []

    def make_hook(target: Target):
        def hook(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            captured.append((target, inputs[0].detach(), output))
        return hook

    handles = [t.module.register_forward_hook(make_hook(t)) for t in targets]
    bar = tqdm(total=options.total_tokens, initial=sums.tokens_seen, unit="tok", unit_scale=True,
               desc="collect", disable=not options.progress)
    try:
        with _only_targets_require_grad(model, targets), _no_tf32():
            for index, batch in enumerate(batches):
                if index < sums.batches_done:
                    continue  # covered by the checkpoint we resumed from
                captured.clear()
                batch = _to_device(batch, device)
                out = objective(model, batch, batch_generator(options.seed, index, device))
                if not torch.isfinite(out.loss):
                    raise CollectError(f"batch {index}: the loss is {out.loss.item()} (NaN/inf); nothing accumulated")
                mask = out.positions_mask
                counted = int(mask.sum())
                if counted:
                    grads = torch.autograd.grad(out.loss, [o for _, _, o in captured], allow_unused=True)
                    _accumulate(sums, captured, grads, mask, acc_dtype, index)
                    for target, _, _ in captured:
                        sums.positions[target.name] += counted
                captured.clear()
                sums.batches_done = index + 1
                tokens = _batch_tokens(batch)
                sums.tokens_seen += tokens
                bar.update(tokens)
                if options.checkpoint_dir is not None and sums.batches_done % options.checkpoint_every == 0:
                    _save_checkpoint(sums, options, targets)
    finally:
        bar.close()
        for handle in handles:
            handle.remove()

    if sums.batches_done == 0:
        raise CollectError("no data: the batch iterator was empty")
    return _finish(model, targets, sums, options, objective, model_name)


def _accumulate(sums: _Sums, captured, grads, mask: torch.Tensor, acc_dtype: torch.dtype, index: int) -> None:
    for (target, x_in, _), g_out in zip(captured, grads):
        x_nd = _rows(x_in, mask, target.name, "input").to(acc_dtype)
        if g_out is None:
            g_nd = torch.zeros(x_nd.shape[0], target.shape_oi[0], dtype=acc_dtype, device=x_nd.device)
        else:
            g_nd = _rows(g_out, mask, target.name, "output gradient").to(acc_dtype)
        for what, rows in (("inputs", x_nd), ("output gradients", g_nd)):
            if not torch.isfinite(rows).all():
                raise CollectError(f"batch {index}: non-finite {what} at {target.name} (NaN/inf); nothing accumulated "
                                   "from this batch. Check the model dtype (try float32) and the data.")
        sums.a_sum[target.name].addmm_(x_nd.T, x_nd)
        sums.g_sum[target.name].addmm_(g_nd.T, g_nd)


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """Accumulate covariances at full float32 precision on GPUs (TF32 off)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _finish(model, targets, sums: _Sums, options: CollectOptions, objective, model_name) -> FactorSet:
    factors: dict[str, TargetFactors] = {}
    for target in targets:
        n = sums.positions[target.name]
        if n == 0:
            raise CollectError(f"{target.name}: no counted positions (every sequence shorter than 2 tokens, "
                               "all padding, or the module never ran)")
        factors[target.name] = TargetFactors(
            A=(sums.a_sum[target.name] / n).cpu(), G=(sums.g_sum[target.name] / n).cpu(), positions=n,
            weight_sha256=weight_sha256(target), transposed=target.transposed)
    collection = {
        "label_mode": options.label_mode,
        "accumulate_dtype": options.accumulate_dtype,
        "seed": options.seed,
        "objective": {"type": type(objective).__name__,
                      **{k: v for k, v in getattr(objective, "__dict__", {}).items() if isinstance(v, (str, int, float))}},
        "model_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "batches": sums.batches_done,
        "tokens": sums.tokens_seen,
        "data": options.description,
        **options.extra,
    }
    return FactorSet(targets=factors, model=model_identity(model, targets, model_name), collection=collection)
