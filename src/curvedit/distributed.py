"""Data-parallel factor collection under `torch.distributed`.

Every rank holds the whole model and reads the same, deterministic batch source. Batch
`i` (its index in that source) belongs to rank `i % world_size`; each rank still walks
past every batch, so that all ranks reach each checkpoint together and labels are drawn
from `(seed, i)` with the *global* index `i` exactly as one process would draw them. The
running sums and position counts are all-reduced (SUM) at checkpoints and at the end of
each pass; only rank 0 writes files.

Evaluation shards the same way: `map_batches` cuts a list of work items into the
batches one process would form, runs batch `c` on rank `c % world_size` and gathers the
results to every rank in order, so each batch is computed exactly as one process would
compute it and every rank returns the single-process result.

The backend is the one the process group was created with: gloo for CPU tensors, NCCL
for CUDA tensors (each rank on its own GPU). `init_from_env` creates the group from the
variables `torchrun` sets (`WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `MASTER_ADDR`,
`MASTER_PORT`). With `shard_model` the *weights* are sharded too (FSDP2,
`torch.distributed.fsdp.fully_shard`, one unit per transformer block): each rank keeps
1/N of them and gathers one block at a time for its forward and backward pass; the
collection hooks see the same inputs and output gradients, so the factors are the same.
"""

from __future__ import annotations

import contextvars
import os
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from curvedit.errors import CurveditError

T = TypeVar("T")
R = TypeVar("R")

# True while this process runs its share of a `map_batches`: nested calls run locally.
_INSIDE_SHARD = contextvars.ContextVar("curvedit_inside_shard", default=False)


class DistributedError(CurveditError, RuntimeError):
    """Ranks that disagree (different data, different settings) or a bad launch setup."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a data-parallel run.

    Attributes:
        rank: this process's rank, 0 ... world_size - 1.
        world_size: the number of processes (1 when not distributed).
        local_rank: the rank on this host (selects `cuda:LOCAL_RANK`).
        local_world_size: the processes on this host (they share its RAM).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the only one that writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1

    def owns(self, index: int) -> bool:
        """Whether batch `index` (global, 0-based) is processed by this rank."""
        return index % self.world_size == self.rank


def current_context() -> DistContext:
    """The rank and world size of the default process group, or a single-process context.

    Returns:
        A `DistContext`; `(0, 1, 0)` when `torch.distributed` is not initialised.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistContext(rank=rank, world_size=world_size, local_rank=int(os.environ.get("LOCAL_RANK", rank)),
                       local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))


def env_world_size() -> int:
    """`WORLD_SIZE` from the environment (set by `torchrun`), 1 when unset."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: str) -> tuple[DistContext, str]:
    """Create the default process group from `torchrun`'s environment, when it asks for one.

    Nothing happens when `WORLD_SIZE` is unset or 1, or a group already exists. Otherwise
    the backend is NCCL for CUDA devices (each rank on `cuda:LOCAL_RANK`) and gloo for CPU.

    Args:
        device: the device the user asked for: "cpu" or "cuda" (not "cuda:N" when
            distributed: each rank takes the GPU of its local rank).

    Returns:
        (the context, the device this rank must use).

    Raises:
        DistributedError: a "cuda:N" device in a multi-process run, or CUDA asked for
            but not available.
    """
    if env_world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return current_context(), device
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    kind = torch.device(device).type
    if kind == "cuda":
        if torch.device(device).index is not None:
            raise DistributedError(f"--device {device}: under torchrun use --device cuda; "
                                   "each rank takes cuda:LOCAL_RANK")
        if not torch.cuda.is_available():
            raise DistributedError("--device cuda but CUDA is not available")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
        dist.init_process_group(backend="nccl")
    elif kind == "cpu":
        dist.init_process_group(backend="gloo")
    else:
        raise DistributedError(f"--device {device}: distributed collection supports cpu (gloo) and cuda (nccl)")
    return current_context(), device


def destroy() -> None:
    """Destroy the default process group if one exists (the end of a distributed run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device(tensors: list[torch.Tensor]) -> torch.device:
    if dist.get_backend() == "nccl":
        for tensor in tensors:
            if tensor.device.type != "cuda":
                raise DistributedError("the NCCL backend reduces CUDA tensors only, but the accumulators are on "
                                       f"{tensor.device}; use the gloo backend for CPU collection")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_sums(tensors: list[torch.Tensor], counts: list[int], batches_done: int, ctx: DistContext,
                *, keep_on_all: bool) -> list[int]:
    """All-reduce (SUM) running sums in place, and their integer counts.

    First checks that every rank has walked the same number of batches (a cheap MIN/MAX
    reduction), so that ranks reading different data fail together instead of hanging.

    Args:
        tensors: this rank's partial sums; overwritten with the sums over all ranks.
        counts: this rank's partial counts (positions, tokens).
        batches_done: how many batches of the source this rank has walked past.
        ctx: this rank's context.
        keep_on_all: True: every rank keeps the total (the end of a pass). False: rank 0
            keeps the total and the other ranks restart from zero (their tensors are
            zeroed and their counts returned as 0), so a later reduction counts nothing
            twice (a checkpoint in the middle of a pass).

    Returns:
        The counts after the reduction (totals, or zeros on ranks other than 0 when
        `keep_on_all` is False). Unchanged when the run is not distributed.

    Raises:
        DistributedError: ranks that walked different numbers of batches, or tensors on a
            device the backend cannot reduce.
    """
    if not ctx.distributed:
        return list(counts)
    device = _comm_device(tensors)
    steps = torch.tensor([batches_done, -batches_done], dtype=torch.int64, device=device)
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)
    most, fewest = int(steps[0]), -int(steps[1])
    if most != fewest:
        raise DistributedError(f"ranks disagree on the data: between {fewest} and {most} batches walked at this "
                               "reduction; every rank must read the same, deterministic batch source")
    totals = torch.tensor(counts, dtype=torch.int64, device=device)
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    if keep_on_all or ctx.is_main:
        return [int(v) for v in totals.tolist()]
    for tensor in tensors:
        tensor.zero_()
    return [0] * len(counts)


def all_agree(flag: bool, ctx: DistContext) -> bool:
    """Whether `flag` holds on every rank (True on all ranks or False on all ranks).

    Args:
        flag: this rank's answer.
        ctx: this rank's context.

    Returns:
        The logical AND of `flag` over the ranks (`flag` itself when not distributed).
    """
    if not ctx.distributed:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([int(flag)], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def check_same(flag: bool, ctx: DistContext, message: str) -> None:
    """Raise on every rank unless `flag` is the same on all ranks (no-op when not distributed).

    Raises:
        DistributedError: `message`, when the ranks disagree.
    """
    if not ctx.distributed:
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([int(flag), -int(flag)], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    if int(value[0]) != -int(value[1]):
        raise DistributedError(message)


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op when not distributed); e.g. until rank 0 has written."""
    if ctx.distributed:
        dist.barrier()


def map_batches(items: Sequence[T], batch_size: int, fn: Callable[[list[T]], list[R]],
                ctx: DistContext | None = None) -> list[R]:
    """`fn` over consecutive batches of `items`, concatenated; sharded over the ranks.

    Batch `c` (items `c * batch_size` ...) runs on rank `c % world_size`; the results
    are gathered (`all_gather_object`) so that every rank returns the whole list, in
    batch order: the same batches, hence the same numbers, as one process. Calls made
    by `fn` itself run locally (a nested `map_batches` does not shard again).

    Args:
        items: the work items, identical on every rank.
        batch_size: items per call of `fn`.
        fn: maps one batch to one result per item (or any list; lists are concatenated).
        ctx: this rank's context (default: the current process group's).

    Returns:
        The concatenated results of all batches.

    Raises:
        ValueError: batch_size below 1.
        DistributedError: `fn` failed on another rank (the failing rank re-raises its own
            error), so that no rank waits forever.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    ctx = ctx or current_context()
    chunks = [list(items[start:start + batch_size]) for start in range(0, len(items), batch_size)]
    if not ctx.distributed or _INSIDE_SHARD.get():
        return [result for chunk in chunks for result in fn(chunk)]
    token = _INSIDE_SHARD.set(True)
    mine: dict[int, list[R]] = {}
    failure: BaseException | None = None
    try:
        for index, chunk in enumerate(chunks):
            if ctx.owns(index):
                mine[index] = fn(chunk)
    except Exception as err:  # noqa: BLE001 - re-raised below, after telling the other ranks
        failure = err
    finally:
        _INSIDE_SHARD.reset(token)
    gathered: list = [None] * ctx.world_size
    dist.all_gather_object(gathered, {"error": f"{type(failure).__name__}: {failure}"} if failure else mine)
    if failure is not None:
        raise failure
    for rank, part in enumerate(gathered):
        if "error" in part:
            raise DistributedError(f"rank {rank} failed: {part['error']}")
    merged: dict[int, list[R]] = {}
    for part in gathered:
        merged.update(part)
    return [result for index in range(len(chunks)) for result in merged[index]]


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated transformer blocks: transformers' `GradientCheckpointingLayer`s
    (transformers >= 4.52); none with an older transformers or a model of another library."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer  # noqa: PLC0415
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def is_sharded_model(model: nn.Module) -> bool:
    """Whether `shard_model` (FSDP2) sharded this model's weights."""
    from torch.distributed.fsdp import FSDPModule  # noqa: PLC0415

    return isinstance(model, FSDPModule)


def shard_model(model: nn.Module, device: str | torch.device, ctx: DistContext | None = None) -> nn.Module:
    """Shard the model's weights over the ranks with FSDP2, then move the shards to `device`.

    Each transformer block is one FSDP unit (its weights are gathered for its forward
    pass and again for its backward pass, then freed); the embeddings, final norm and
    head form the root unit. Load the model on the CPU first: only the shards move to
    `device`, so a GPU holds about 1/N of the weights.

    Args:
        model: a transformers model, loaded on the CPU (or already on `device`).
        device: "cpu" (gloo) or this rank's "cuda:i" (NCCL).
        ctx: this rank's context (default: the current process group's).

    Returns:
        The model, sharded in place (its parameters become DTensors).

    Raises:
        DistributedError: no process group with at least 2 ranks, or no transformer blocks.
    """
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    ctx = ctx or current_context()
    if not ctx.distributed:
        raise DistributedError("sharding the weights (FSDP) needs several processes: launch with "
                               "torchrun --nproc-per-node N (N >= 2)")
    blocks = transformer_blocks(model)
    if not blocks:
        raise DistributedError(f"FSDP shards transformers blocks (GradientCheckpointingLayer, transformers >= "
                               f"4.52); {type(model).__name__} has none")
    mesh = init_device_mesh(torch.device(device).type, (ctx.world_size,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model.to(device)
