"""K-FAC factor collection: hooks on the target modules and float32+ accumulators.

For each target `y = W x`, one pass over the data accumulates
`sum x x^T` and `sum g g^T` over the positions the objective counts, where `g` is the
gradient of the summed loss with respect to the target's output. Only those output
gradients are computed (`torch.autograd.grad` on the outputs): no parameter gradient is
formed or stored.

Two ways to scale (both give the factors of the plain run, to round-off):
- Layer-group passes (`CollectOptions.layers_per_pass = K`): one pass over the data per
  group of K blocks, hooking only that group's targets, so that only its accumulators
  live on the device (finished groups are moved to CPU). The batch source must then be
  re-iterable: a list (or another re-iterable collection) or a callable returning a fresh
  iterable of the same batches on each call.
- Data parallel (`torch.distributed` initialised, e.g. under `torchrun`): batch `i` is
  processed by rank `i % world_size`, the sums are all-reduced at checkpoints and at the
  end of each pass, only rank 0 writes checkpoints; see `curvedit.distributed`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator as IteratorABC
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Union

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from curvedit.distributed import (
    DistContext,
    check_same,
    current_context,
    is_sharded_model,
    reduce_sums,
    transformer_blocks,
)
from curvedit.errors import CurveditError
from curvedit.io import safetensors_metadata, write_safetensors
from curvedit.kfac.factors import FactorSet, TargetFactors, model_identity, weight_sha256
from curvedit.kfac.objectives import LABEL_MODES, CausalLMObjective, Objective
from curvedit.kfac.targets import Target
from curvedit.models import context_window

ACCUMULATE_DTYPES = {"float32": torch.float32, "float64": torch.float64}
CHECKPOINT_TENSORS = "checkpoint.safetensors"
CHECKPOINT_KEY = "curvedit-checkpoint"

BatchSource = Union[Iterable[dict], Callable[[], Iterable[dict]]]
"""Batches: an iterable of batch dicts, or a callable returning a fresh such iterable."""


class CollectError(CurveditError, RuntimeError):
    """Collection cannot produce trustworthy factors (no data, non-finite values, ...)."""


@dataclass
class CollectOptions:
    """Options of a collection run.

    Attributes:
        label_mode: "sampled" (labels drawn from the model: true Fisher) or "gold".
        accumulate_dtype: "float32" or "float64" accumulators, whatever the model dtype.
        seed: seed of the label sampler (runs are repeatable for a seed).
        checkpoint_dir: where to write checkpoints; None for no checkpoints.
        checkpoint_every: write a checkpoint every this many batches (under FSDP, rounded
            up to a multiple of the number of processes).
        resume: continue from the checkpoint in `checkpoint_dir` (skips the batches it
            covered; labels are drawn per batch from (seed, batch index), so they match).
        progress: show a progress bar (tokens/s, ETA when `total_tokens` is known).
        total_tokens: expected number of tokens, for the progress bar's ETA.
        description: a description of the data, stored with the factors.
        extra: more fields stored in the factors' `collection` metadata.
        layers_per_pass: hook the targets of at most this many blocks per pass over the
            data (one pass per group of blocks, in module order; targets without a block
            index form one block). None: every target in one pass. More than one pass
            needs a re-iterable batch source (see `collect_factors`).
        gradient_checkpointing: keep only each transformer block's input in the forward
            pass and recompute the block in the backward pass (non-reentrant
            `torch.utils.checkpoint` on the model's `GradientCheckpointingLayer` blocks):
            less activation memory for about one more forward pass; the same factors.
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
    layers_per_pass: int | None = None
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        """Raise CollectError for an unknown label mode or accumulate dtype, or a checkpoint
        interval or layers per pass below 1 (each message names the command-line flag too)."""
        if self.label_mode not in LABEL_MODES:
            raise CollectError(f"the label mode (--labels) must be one of {', '.join(LABEL_MODES)}, "
                               f"got {self.label_mode!r}")
        if self.accumulate_dtype not in ACCUMULATE_DTYPES:
            raise CollectError(f"the accumulate dtype (--accumulate-dtype) must be one of "
                               f"{', '.join(ACCUMULATE_DTYPES)}, got {self.accumulate_dtype!r}")
        if self.checkpoint_every < 1:
            raise CollectError(f"the checkpoint interval (--checkpoint-every) must be at least 1, "
                               f"got {self.checkpoint_every}")
        if self.layers_per_pass is not None and self.layers_per_pass < 1:
            raise CollectError(f"layers per pass (--layers-per-pass) must be at least 1, got {self.layers_per_pass}")


@dataclass
class _Sums:
    """Running sums of a collection.

    `a_sum`/`g_sum` hold the targets of finished passes (on CPU when there are several
    passes) and of the current pass (on the model's device); `batches_done` counts the
    batches of the current pass walked so far (every rank walks every batch);
    `tokens_seen` counts tokens of the first pass only.
    """

    a_sum: dict[str, torch.Tensor]
    g_sum: dict[str, torch.Tensor]
    positions: dict[str, int]
    batches_done: int = 0
    tokens_seen: int = 0
    pass_index: int = 0
    batches_per_pass: int | None = None


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


@contextlib.contextmanager
def _checkpointed_blocks(model: nn.Module, enable: bool) -> Iterator[None]:
    """Within the block, transformers blocks recompute their activations in the backward
    pass. Only the blocks' own `training` flag is set (transformers checkpoints in training
    mode only); their submodules stay in eval mode, so dropout stays off."""
    if not enable:
        yield
        return

    from torch.utils.checkpoint import checkpoint  # noqa: PLC0415

    blocks = transformer_blocks(model)
    if not blocks:
        raise CollectError(f"gradient checkpointing needs transformers blocks (GradientCheckpointingLayer, "
                           f"transformers >= 4.52); {type(model).__name__} has none")
    saved = [(m.training, m.gradient_checkpointing, getattr(m, "_gradient_checkpointing_func", None)) for m in blocks]
    try:
        for block in blocks:
            block.training, block.gradient_checkpointing = True, True
            block._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
        yield
    finally:
        for block, (training, flag, func) in zip(blocks, saved):
            block.training, block.gradient_checkpointing = training, flag
            if func is None:
                del block._gradient_checkpointing_func
            else:
                block._gradient_checkpointing_func = func


def layer_groups(targets: list[Target], layers_per_pass: int | None) -> list[list[Target]]:
    """Split targets into the groups hooked by successive passes over the data.

    Blocks are taken in the order of their first target (module order) and cut into runs
    of `layers_per_pass` blocks; targets without a block index (`layer` None) count as one
    block. Within a group, targets keep module order.

    Args:
        targets: from `select_targets`.
        layers_per_pass: blocks per pass; None for one pass over all targets.

    Returns:
        The non-empty groups, in pass order.

    Raises:
        CollectError: `layers_per_pass` below 1.
    """
    if layers_per_pass is None:
        return [list(targets)]
    if layers_per_pass < 1:
        raise CollectError(f"layers per pass (--layers-per-pass) must be at least 1, got {layers_per_pass}")
    blocks = list(dict.fromkeys(t.layer for t in targets))
    chunks = [set(blocks[i:i + layers_per_pass]) for i in range(0, len(blocks), layers_per_pass)]
    return [[t for t in targets if t.layer in chunk] for chunk in chunks]


def _batch_factory(batches: BatchSource, passes: int) -> Callable[[], Iterable[dict]]:
    if callable(batches):
        return batches
    if passes > 1 and isinstance(batches, IteratorABC):
        raise CollectError(f"{passes} layer-group passes read the data once per pass, but `batches` is a one-shot "
                         "iterator; pass a list or a callable that returns a fresh iterable of the same batches")
    return lambda: batches


def _fingerprint(targets: list[Target], options: CollectOptions, passes: int, weights_hash: str) -> dict[str, Any]:
    """Everything a checkpoint's sums depend on besides the batches themselves (those are
    compared by `data_sha256`)."""
    fingerprint = {"targets": [t.name for t in targets], "label_mode": options.label_mode,
                   "accumulate_dtype": options.accumulate_dtype, "seed": options.seed,
                   "model weights": weights_hash, "data": options.description,
                   **{f"setting {k}": v for k, v in sorted(options.extra.items())}}
    if passes > 1:
        fingerprint["layers_per_pass"] = options.layers_per_pass
    return fingerprint


class _DataDigest:
    """A running SHA-256 of the batches walked in the current pass (keys, shapes and
    values), so a resume can check that it reads the same data the checkpoint covered."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()

    def update(self, batch: dict) -> None:
        for key in sorted(batch):
            value = batch[key]
            if isinstance(value, torch.Tensor):
                self.digest.update(f"{key}{tuple(value.shape)}{value.dtype}".encode())
                self.digest.update(value.detach().cpu().contiguous().numpy().tobytes())

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


def _save_checkpoint(sums: _Sums, options: CollectOptions, targets: list[Target], passes: int, ctx: DistContext,
                     weights_hash: str, data_digest: str) -> None:
    """One file, one atomic rename: the sums, with every count and the fingerprint in the
    safetensors header (a kill at any moment leaves the old checkpoint or the new one)."""
    root = Path(options.checkpoint_dir)
    tensors = {f"{n}.A_sum": t for n, t in sums.a_sum.items()} | {f"{n}.G_sum": t for n, t in sums.g_sum.items()}
    meta = {
        "fingerprint": _fingerprint(targets, options, passes, weights_hash),
        "data_sha256": data_digest,
        "positions": sums.positions,
        "batches_done": sums.batches_done,
        "tokens_seen": sums.tokens_seen,
        "pass_index": sums.pass_index,
        "batches_per_pass": sums.batches_per_pass,
        "world_size": ctx.world_size,
    }
    write_safetensors(root / CHECKPOINT_TENSORS, tensors, metadata={CHECKPOINT_KEY: json.dumps(meta)})


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of a checkpoint file (`checkpoint.safetensors`): fingerprint, data
    digest, positions, batches done, tokens seen, pass index.

    Raises:
        CollectError: the file is not a readable curvedit checkpoint.
    """
    header = safetensors_metadata(path, CollectError).get(CHECKPOINT_KEY)
    if header is None:
        raise CollectError(f"--resume: {path} is not a curvedit checkpoint (no {CHECKPOINT_KEY!r} header)")
    return json.loads(header)


def _load_checkpoint(sums: _Sums, options: CollectOptions, targets: list[Target], groups: list[list[Target]],
                     ctx: DistContext, device: torch.device, acc_dtype: torch.dtype, weights_hash: str) -> str:
    """Restore the sums of a checkpoint. It holds totals over all ranks, so rank 0 takes the
    current pass's partial sums and the other ranks start that pass from zero; any world
    size may resume any checkpoint (batch ownership follows the global batch index).

    Returns:
        The checkpoint's digest of the batches it covered in its pass.

    Raises:
        CollectError: no checkpoint, or one made with other settings, model or data
            (naming what differs).
    """
    root = Path(options.checkpoint_dir)
    path = root / CHECKPOINT_TENSORS
    if not path.is_file():
        raise CollectError(f"--resume: no checkpoint in {root}")
    meta = read_checkpoint_meta(path)
    ours = _fingerprint(targets, options, len(groups), weights_hash)
    theirs = meta["fingerprint"]
    differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if differ:
        details = "; ".join(f"{k}: checkpoint {theirs.get(k)!r}, now {ours.get(k)!r}" for k in differ)
        raise CollectError(f"--resume: the checkpoint in {root} belongs to another run ({details}); resume with the "
                           "same model, data and settings, or start over with --overwrite")
    tensors = load_file(str(path))
    sums.pass_index = meta.get("pass_index", 0)
    sums.batches_done = meta["batches_done"]
    sums.batches_per_pass = meta.get("batches_per_pass")
    for index, group in enumerate(groups[:sums.pass_index + 1]):
        finished = index < sums.pass_index
        if not (finished or ctx.is_main):
            continue
        where = torch.device("cpu") if finished and len(groups) > 1 else device
        for target in group:
            a_key, g_key = f"{target.name}.A_sum", f"{target.name}.G_sum"
            if a_key not in tensors or g_key not in tensors:
                if finished or sums.batches_done > 0:
                    raise CollectError(f"--resume: the checkpoint in {root} lacks the sums of {target.name}")
                continue
            sums.a_sum[target.name] = tensors[a_key].to(device=where, dtype=acc_dtype)
            sums.g_sum[target.name] = tensors[g_key].to(device=where, dtype=acc_dtype)
            sums.positions[target.name] = int(meta["positions"][target.name])
    sums.tokens_seen = meta["tokens_seen"] if (sums.pass_index > 0 or ctx.is_main) else 0
    return meta["data_sha256"]


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
    """Move a batch's tensors to `device`; to a GPU through pinned memory, asynchronously."""
    def move(v: torch.Tensor) -> torch.Tensor:
        if device.type == "cuda" and v.device.type == "cpu":
            return (v if v.is_pinned() else v.pin_memory()).to(device, non_blocking=True)
        return v.to(device)
    return {k: move(v) if torch.is_tensor(v) else v for k, v in batch.items()}


def _offload(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of an accumulator; from a GPU into pinned memory (the caller synchronises)."""
    if tensor.device.type != "cuda":
        return tensor.cpu()
    try:
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    except RuntimeError:  # page-locked memory is limited: a plain copy works anyway
        return tensor.cpu()
    return host.copy_(tensor, non_blocking=True)


def _rows(tensor: torch.Tensor, mask: torch.Tensor, name: str, what: str) -> torch.Tensor:
    """Flatten a target's `(*S, d)` tensor to the `(n, d)` rows of counted positions."""
    if tuple(tensor.shape[:-1]) != tuple(mask.shape):
        raise CollectError(f"{name}: {what} has leading shape {tuple(tensor.shape[:-1])}, "
                           f"but the objective's positions mask is {tuple(mask.shape)}")
    return tensor[mask]


def collect_factors(
    model: nn.Module,
    batches: BatchSource,
    targets: list[Target],
    objective: Objective | None = None,
    options: CollectOptions | None = None,
    model_name: str | None = None,
) -> FactorSet:
    """Collect K-FAC factors `A = mean x x^T`, `G = mean g g^T` for each target.

    Under an initialised `torch.distributed` process group every rank must call this with
    the same model, targets, options and batch source; each processes the batches it owns
    (index `i` on rank `i % world_size`), and every rank returns the same factors (only
    rank 0 writes checkpoints).

    Args:
        model: the model (any dtype/device; its weights are not changed).
        batches: dicts of tensors the objective understands (`input_ids` and
            `attention_mask` for LMs, `pixel_values` for images), or a callable that
            returns a fresh iterable of them. Must be deterministic across runs for
            `resume`, across ranks for a distributed run, and across calls (or, for a
            list, iterations) when `options.layers_per_pass` makes several passes.
        targets: from `select_targets`.
        objective: how a batch becomes a summed loss and a positions mask; default
            `CausalLMObjective(options.label_mode)`.
        options: `CollectOptions`.
        model_name: the name stored in the factor metadata.

    Returns:
        A `FactorSet` of means (on CPU), with metadata.

    Raises:
        CollectError: no batches, a target without counted positions, NaN/inf in the loss,
            inputs or gradients (naming the batch and target), a bad resume, or a batch
            source that gives a different number of batches in a later pass.
        curvedit.distributed.DistributedError: ranks that walked different numbers of
            batches.
            Also: bad options (`CollectOptions.validate`), or a one-shot iterator with several
            passes.
    """
    options = options or CollectOptions()
    options.validate()
    groups = layer_groups(targets, options.layers_per_pass)
    make_batches = _batch_factory(batches, len(groups))
    objective = objective or CausalLMObjective(options.label_mode)
    acc_dtype = ACCUMULATE_DTYPES[options.accumulate_dtype]
    device = next(model.parameters()).device
    ctx = current_context()
    sums = _Sums(a_sum={}, g_sum={}, positions={t.name: 0 for t in targets})
    weights_hash = model_identity(model, targets)["weights_hash"] if options.checkpoint_dir is not None else ""
    resumed_digest = None
    if options.resume:
        resumed_digest = _load_checkpoint(sums, options, targets, groups, ctx, device, acc_dtype, weights_hash)
    for pass_index in range(sums.pass_index, len(groups)):
        _collect_pass(model, make_batches(), targets, groups, pass_index, objective, options, sums, ctx,
                      device, acc_dtype, weights_hash, resumed_digest)
        resumed_digest = None
    return _finish(model, targets, sums, options, objective, model_name, ctx)


def _collect_pass(model: nn.Module, batches: Iterable[dict], targets: list[Target], groups: list[list[Target]],
                  pass_index: int, objective: Objective, options: CollectOptions, sums: _Sums, ctx: DistContext,
                  device: torch.device, acc_dtype: torch.dtype, weights_hash: str,
                  resumed_digest: str | None) -> None:
    """One pass over the data hooking `groups[pass_index]`; reduces, checks and offloads its
    sums. A resumed pass first checks that the batches the checkpoint covered are the ones
    read now (`resumed_digest`)."""
    group = groups[pass_index]
    _zero_sums(sums, group, acc_dtype, device)
    first_pass = pass_index == 0
    recorder = _Recorder()
    handles = recorder.hook(group)
    total = None if options.total_tokens is None else options.total_tokens // ctx.world_size
    desc = "collect" if len(groups) == 1 else f"collect pass {pass_index + 1}/{len(groups)}"
    bar = tqdm(total=total, initial=sums.tokens_seen if first_pass else 0, unit="tok", unit_scale=True,
               desc=desc, disable=not (options.progress and ctx.is_main))

    # Under FSDP every rank must run one forward/backward per round of `world_size` batches
    # (each gathers the blocks' weights from all ranks): a rank whose batch of a round is
    # missing (the data ended) or already covered (resumed mid-round) runs a lock-step pass,
    # checkpoints fall on round ends, and ranks check at each round that all still have data.
    lockstep = ctx.distributed and is_sharded_model(model)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    world = ctx.world_size
    uneven = "ranks disagree on the data: one ran out of batches before another (FSDP needs the same batches)"
    every = -(-options.checkpoint_every // world) * world if lockstep else options.checkpoint_every

    step = _BatchStep(model=model, objective=objective, recorder=recorder, sums=sums, options=options, device=device,
                      acc_dtype=acc_dtype, context=context_window(model),
                      vocab=getattr(embeddings, "num_embeddings", None), lockstep=lockstep, first_pass=first_pass,
                      bar=bar)

    start = sums.batches_done  # batches before it are covered by the checkpoint we resumed from
    covered: dict | None = None  # this rank's covered batch of the round `start` falls in
    last: dict | None = None
    digest = _DataDigest() if options.checkpoint_dir is not None else None
    try:
        with _only_targets_require_grad(model, group), no_tf32(), \
                _checkpointed_blocks(model, options.gradient_checkpointing):
            walked = 0
            for index, batch in enumerate(batches):
                last, walked = batch, index + 1
                if digest is not None:
                    digest.update(batch)
                if resumed_digest is not None and index == start - 1 and digest.hexdigest() != resumed_digest:
                    raise CollectError(f"--resume: the first {start} batches read now differ from those the checkpoint "
                                       "covered (another corpus, --seq-len, --batch-size or token budget); resume "
                                       "with the same data, or start over with --overwrite")
                if index < start:
                    if lockstep and ctx.owns(index) and index // world == start // world:
                        covered = batch
                    continue
                if lockstep and (index == start or index % world == 0):
                    check_same(True, ctx, uneven)
                if covered is not None:
                    step(covered, index, accumulate=False)
                    covered = None
                if ctx.owns(index):
                    step(batch, index, accumulate=True)
                sums.batches_done = index + 1
                if options.checkpoint_dir is not None and sums.batches_done % every == 0:
                    _reduce_pass(sums, group, first_pass, ctx, keep_on_all=False)
                    if ctx.is_main:
                        _save_checkpoint(sums, options, targets, len(groups), ctx, weights_hash, digest.hexdigest())
            done = sums.batches_done
            if resumed_digest is not None and walked < start:
                raise CollectError(f"--resume: the data ends after {walked} batches; the checkpoint covered {start}")
            if lockstep:
                if done > start and (done - 1) // world * world + ctx.rank >= done:
                    step(last, done - 1, accumulate=False)  # no batch of the last round is this rank's
                check_same(False, ctx, uneven)  # a rank still walking batches fails here too
    finally:
        bar.close()
        for handle in handles:
            handle.remove()

    _end_pass(sums, targets, groups, pass_index, options, ctx, device, weights_hash)


class _Recorder:
    """Forward hooks that keep each target's input and output, during the forward pass only
    (not a gradient checkpoint's recomputation)."""

    def __init__(self) -> None:
        self.captured: list[tuple[Target, torch.Tensor, torch.Tensor]] = []
        self.recording = False

    def hook(self, group: list[Target]) -> list[Any]:
        """Hook every target of `group`; returns the handles to remove."""
        def make(target: Target) -> Callable[..., None]:
            def record(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
                if self.recording:
                    self.captured.append((target, inputs[0].detach(), output))
            return record
        return [t.module.register_forward_hook(make(t)) for t in group]


@dataclass
class _BatchStep:
    """Forward and backward of one batch of a pass, its rows added to the sums (a lock-step
    batch under FSDP runs the same collectives and adds nothing)."""

    model: nn.Module
    objective: Objective
    recorder: _Recorder
    sums: _Sums
    options: CollectOptions
    device: torch.device
    acc_dtype: torch.dtype
    context: int | None
    vocab: int | None
    lockstep: bool
    first_pass: bool
    bar: Any

    def __call__(self, batch: dict, index: int, accumulate: bool) -> None:
        """Run batch `index`; add it to the sums when `accumulate`.

        Raises:
            CollectError: a batch too long or outside the vocabulary, or a NaN/inf loss.
        """
        _check_batch(batch, index, self.context, self.vocab)
        captured = self.recorder.captured
        captured.clear()
        batch = _to_device(batch, self.device)
        self.recorder.recording = True
        try:
            out = self.objective(self.model, batch, batch_generator(self.options.seed, index, self.device))
        finally:
            self.recorder.recording = False
        if not torch.isfinite(out.loss):
            raise CollectError(f"batch {index}: the loss is {out.loss.item()} (NaN/inf); nothing accumulated")
        mask = out.positions_mask
        counted = int(mask.sum())
        if counted or self.lockstep:  # under FSDP every rank runs every backward (its all-gathers)
            grads = torch.autograd.grad(out.loss, [o for _, _, o in captured], allow_unused=True)
            if accumulate and counted:
                _accumulate(self.sums, captured, grads, mask, self.acc_dtype, index)
                for target, _, _ in captured:
                    self.sums.positions[target.name] += counted
        captured.clear()
        if accumulate:
            tokens = _batch_tokens(batch)
            if self.first_pass:
                self.sums.tokens_seen += tokens
            self.bar.update(tokens)


def _zero_sums(sums: _Sums, group: list[Target], acc_dtype: torch.dtype, device: torch.device) -> None:
    """Zero sums on `device` for the targets of `group` that have none yet (a resumed pass keeps its own)."""
    for target in group:
        d_out, d_in = target.shape_oi
        if target.name not in sums.a_sum:
            sums.a_sum[target.name] = torch.zeros(d_in, d_in, dtype=acc_dtype, device=device)
            sums.g_sum[target.name] = torch.zeros(d_out, d_out, dtype=acc_dtype, device=device)


def _check_batch(batch: dict, index: int, context: int | None, vocab: int | None) -> None:
    """Refuse a batch longer than the context window or with token ids outside the vocabulary.

    Raises:
        CollectError: naming the batch, the length or the id.
    """
    width = batch["input_ids"].shape[-1] if "input_ids" in batch else 0
    if context is not None and width > context:
        raise CollectError(f"batch {index}: sequences of {width} tokens are longer than the model's context "
                           f"window of {context} tokens (lower --seq-len)")
    if width and vocab is not None:
        ids = batch["input_ids"]
        if "attention_mask" in batch:
            ids = ids[batch["attention_mask"].bool()]
        outside = ids[(ids < 0) | (ids >= vocab)]
        if outside.numel():
            raise CollectError(f"batch {index}: token id {int(outside[0])} is outside the model's vocabulary of "
                               f"{vocab} ids (input_ids made for another tokenizer?)")


def _end_pass(sums: _Sums, targets: list[Target], groups: list[list[Target]], pass_index: int,
              options: CollectOptions, ctx: DistContext, device: torch.device, weights_hash: str) -> None:
    """Reduce the pass's sums, check its batch count against the first pass, offload them when
    more passes follow, and checkpoint the start of the next pass.

    Raises:
        CollectError: no batch at all, or a later pass that read another number of batches.
    """
    group, first_pass = groups[pass_index], pass_index == 0
    _reduce_pass(sums, group, first_pass, ctx, keep_on_all=True)
    if sums.batches_done == 0:
        raise CollectError("no data: the batch iterator was empty")
    if first_pass:
        sums.batches_per_pass = sums.batches_done
    elif sums.batches_done != sums.batches_per_pass:
        raise CollectError(f"pass {pass_index + 1} read {sums.batches_done} batches, the first pass "
                           f"{sums.batches_per_pass}: layer-group passes need the same batches on every pass "
                           "(a list, or a callable returning a fresh iterable of the same data)")
    if len(groups) > 1:
        for target in group:  # offload: only the current group's sums need the device
            sums.a_sum[target.name] = _offload(sums.a_sum[target.name])
            sums.g_sum[target.name] = _offload(sums.g_sum[target.name])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sums.pass_index, sums.batches_done = pass_index + 1, 0
    if options.checkpoint_dir is not None and sums.pass_index < len(groups) and ctx.is_main:
        _save_checkpoint(sums, options, targets, len(groups), ctx, weights_hash, _DataDigest().hexdigest())


def _reduce_pass(sums: _Sums, group: list[Target], first_pass: bool, ctx: DistContext, *, keep_on_all: bool) -> None:
    """All-reduce the current group's sums and counts (tokens only in the first pass: later
    passes walk the same tokens, and the first pass already reduced them)."""
    names = [t.name for t in group]
    counts = [sums.positions[n] for n in names] + ([sums.tokens_seen] if first_pass else [])
    tensors = [sums.a_sum[n] for n in names] + [sums.g_sum[n] for n in names]
    reduced = reduce_sums(tensors, counts, sums.batches_done, ctx, keep_on_all=keep_on_all)
    for name, count in zip(names, reduced):
        sums.positions[name] = count
    if first_pass:
        sums.tokens_seen = reduced[-1]


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
def no_tf32() -> Iterator[None]:
    """Accumulate covariances at full float32 precision on GPUs (TF32 off)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _finish(model, targets, sums: _Sums, options: CollectOptions, objective, model_name, ctx: DistContext) -> FactorSet:
    factors: dict[str, TargetFactors] = {}
    for target in targets:
        n = sums.positions[target.name]
        if n == 0:
            raise CollectError(f"{target.name}: no counted positions (every sequence shorter than 2 tokens, "
                               "all padding, or the module never ran)")
        # In place: the means replace the sums, so the peak does not hold both.
        factors[target.name] = TargetFactors(
            A=sums.a_sum.pop(target.name).div_(n).cpu(), G=sums.g_sum.pop(target.name).div_(n).cpu(), positions=n,
            weight_sha256=weight_sha256(target), transposed=target.transposed)
    collection = {
        "label_mode": options.label_mode,
        "accumulate_dtype": options.accumulate_dtype,
        "seed": options.seed,
        "objective": {"type": type(objective).__name__,
                      **{k: v for k, v in getattr(objective, "__dict__", {}).items()
                         if isinstance(v, (str, int, float))}},
        "model_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "batches": sums.batches_per_pass,
        "tokens": sums.tokens_seen,
        "data": options.description,
        "world_size": ctx.world_size,
        "layers_per_pass": options.layers_per_pass,
        **options.extra,
    }
    return FactorSet(targets=factors, model=model_identity(model, targets, model_name), collection=collection)
