"""A memory plan for a collection run: will it fit, and if not, what to change.

Estimated per process, before the run, from the model config and the targets:

- **weights**: the bytes of the model's parameters and buffers (shared tensors once).
- **activations** (rough, for a transformer; expect within a factor of about 2): autograd
  keeps tensors only from the first hooked block on, so with `n` such blocks, `B*T`
  tokens, hidden size `h`, MLP size `f`, `a` heads and `s` bytes per model element,
  `B*T * n * (10h + 4f + a*T) * s` (norm inputs, q/k/v, attention output, the MLP's four
  `f`-wide tensors; `a*T` is the attention probabilities of eager attention, an
  over-estimate for SDPA/flash), plus the output gradients of the pass's targets
  (`B*T * sum d_out * s`, all alive at once), the counted rows of one target in the
  accumulate dtype (`B*T * (d_in + d_out) * (s + acc)`), and the logits with their float32
  log-softmax, sampling CDF and gradient (`B*T * V * (3s + 20)`; one row per image for
  classifiers). Layers before the first hooked block run without a graph.
- **accumulators**: `d_in^2 + d_out^2` per target at the accumulate dtype; on CUDA only the
  current pass's group is on the device (finished groups move to CPU, and all factors end
  on CPU: the *host* line), on CPU every group stays in RAM.
- **eigh workspace** (a later stage, `spectrum`/`edit`, one target at a time): float64
  `5 d^2` for the largest factor (the matrix, its symmetrised copy, the eigenvectors and
  LAPACK's workspace). Shown, not part of the collect check.

The check compares what the run still has to allocate (the peak minus weights already on
the device, times the processes sharing that memory) with 90% of the free memory:
`torch.cuda.mem_get_info` on CUDA; on CPU, available RAM from psutil when installed, else
`/proc/meminfo`, capped by a cgroup v2 limit when there is one. With FSDP
(`weight_shards` N > 1) a process holds 1/N of the weights plus, gathered, the root unit
(embeddings, head) and two blocks (computing and prefetched); without it every rank holds
all the weights. Either way each process first loads the whole model into host RAM.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from curvedit.distributed import transformer_blocks
from curvedit.errors import CurveditError
from curvedit.kfac.collect import ACCUMULATE_DTYPES, layer_groups
from curvedit.kfac.targets import Target

HEADROOM = 0.9
EIGH_FACTOR = 5
GIB = 1024 ** 3


class MemoryPlanError(CurveditError):
    """Settings a memory plan cannot be made for (an unknown dtype, no targets, sizes below 1)."""


@dataclass(frozen=True)
class _Arch:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int  # logits per token (LMs); 0 for classifiers
    labels: int  # logits per example (classifiers); 0 for LMs


@dataclass
class MemoryPlan:
    """Estimated memory of a collection run, per process, in bytes.

    Attributes:
        device: where the run accumulates ("cpu", "cuda:0", ...).
        batch_size: sequences (or images) per batch.
        seq_len: tokens per sequence used for the estimate.
        accumulate_dtype: "float32" or "float64".
        layers_per_pass: blocks hooked per pass (None: all in one pass).
        passes: the number of passes over the data.
        weights_bytes: parameters and buffers.
        resident_bytes: the part of `weights_bytes` already on `device`.
        activations_bytes: the rough activation peak of one batch (worst pass).
        accumulators_bytes: accumulators on `device` (largest pass on CUDA, all on CPU).
        host_bytes: accumulators/factors in host RAM besides (CUDA runs; 0 on CPU).
        eigh_bytes: the float64 eigh workspace of the largest factor (later stage).
        available_bytes: free memory on `device`, None when unknown.
        host_available_bytes: available host RAM, None when unknown.
        ranks_sharing_memory: processes that share `device`'s memory (CPU data parallel).
        weight_shards: processes the weights are sharded over (FSDP; 1: not sharded).
        suggestion: what to change when the run does not fit ("" when it fits).
    """

    device: str
    batch_size: int
    seq_len: int
    accumulate_dtype: str
    layers_per_pass: int | None
    passes: int
    weights_bytes: int
    resident_bytes: int
    activations_bytes: int
    accumulators_bytes: int
    host_bytes: int
    eigh_bytes: int
    available_bytes: int | None
    host_available_bytes: int | None
    ranks_sharing_memory: int = 1
    weight_shards: int = 1
    suggestion: str = ""

    @property
    def peak_bytes(self) -> int:
        """Weights + activations + device accumulators, per process."""
        return self.weights_bytes + self.activations_bytes + self.accumulators_bytes

    @property
    def needed_bytes(self) -> int:
        """What the run still has to allocate on `device`, over all processes sharing it."""
        return (self.peak_bytes - self.resident_bytes) * self.ranks_sharing_memory

    @property
    def fits(self) -> bool:
        """Whether `needed_bytes` is within 90% of the free memory (and the host part within
        90% of host RAM); True when the free memory cannot be measured."""
        device_ok = self.available_bytes is None or self.needed_bytes <= HEADROOM * self.available_bytes
        host_ok = (self.host_available_bytes is None
                   or self.host_bytes * self.ranks_sharing_memory <= HEADROOM * self.host_available_bytes)
        return device_ok and host_ok

    def table(self) -> str:
        """A compact text table of the plan, ending with the verdict."""
        passes = "1 pass" if self.passes == 1 else f"{self.passes} passes of <= {self.layers_per_pass} blocks"
        shared = f", x{self.ranks_sharing_memory} processes sharing it" if self.ranks_sharing_memory > 1 else ""
        rows = [
            (f"memory plan on {self.device} (per process{shared}): batch {self.batch_size} x {self.seq_len} tokens, "
             f"{passes}, {self.accumulate_dtype} accumulators"),
            _row("weights", self.weights_bytes,
                 (f"1/{self.weight_shards} + root + 2 blocks (FSDP); " if self.weight_shards > 1 else "")
                 + ("already on the device" if self.resident_bytes else "to load")),
            _row("activations (rough)", self.activations_bytes, "per batch, worst pass"),
            _row("accumulators", self.accumulators_bytes,
                 "largest pass" if self.host_bytes else "all passes (stay in RAM)"),
            _row("peak", self.peak_bytes, ""),
        ]
        if self.available_bytes is None:
            rows.append(f"  {'free':<22}{'unknown':>11}  -> not checked")
        else:
            verdict = "fits" if self.fits else "does NOT fit"
            rows.append(_row("free", self.available_bytes, f"-> {verdict}: needs {_size(self.needed_bytes)}, "
                                                           f"limit {HEADROOM:.0%} of free"))
        if self.host_bytes:
            host = "unknown" if self.host_available_bytes is None else _size(self.host_available_bytes)
            rows.append(_row("host: factors on CPU", self.host_bytes, f"of {host} available"))
        rows.append(_row("eigh later", self.eigh_bytes, "spectrum/edit, float64, largest factor; not collect"))
        if self.suggestion:
            rows.append(f"  suggestion: {self.suggestion}")
        return "\n".join(rows)


def _size(n: int) -> str:
    """Bytes in binary units, e.g. "1.5 GiB", "320.0 KiB"."""
    for unit, size in (("TiB", 1024 ** 4), ("GiB", GIB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _row(label: str, n: int, note: str) -> str:
    return f"  {label:<22}{_size(n):>11}  {note}".rstrip()


def _first(config, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _arch(model: nn.Module, targets: list[Target]) -> _Arch:
    """Transformer sizes from the model config; from the targets when there is no config."""
    config = getattr(model, "config", None)
    layers_seen = {t.layer for t in targets if t.layer is not None}
    fallback_hidden = max(t.shape_oi[1] for t in targets)
    hidden = _first(config, ("hidden_size", "n_embd", "d_model")) or fallback_hidden
    vocab = _first(config, ("vocab_size",)) or 0
    fallback_layers = max(layers_seen) + 1 if layers_seen else 1
    return _Arch(
        layers=_first(config, ("num_hidden_layers", "n_layer", "num_layers")) or fallback_layers,
        hidden=hidden,
        intermediate=_first(config, ("intermediate_size", "n_inner", "ffn_dim")) or 4 * hidden,
        heads=_first(config, ("num_attention_heads", "n_head")) or 0,
        vocab=vocab,
        labels=0 if vocab else (_first(config, ("num_labels",)) or 0),
    )


def tokens_per_example(model: nn.Module, seq_len: int) -> int:
    """Tokens per example: `(image_size / patch_size)^2 + 1` for ViT-style configs, else `seq_len`."""
    config = getattr(model, "config", None)
    image, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if isinstance(image, int) and isinstance(patch, int) and patch > 0:
        return (image // patch) ** 2 + 1
    return seq_len


def _weights_bytes(model: nn.Module, device: torch.device) -> tuple[int, int]:
    """(all weight bytes, bytes already on `device`), tied tensors counted once."""
    seen: dict[int, tuple[int, torch.device]] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        seen.setdefault(tensor.data_ptr() or id(tensor), (tensor.numel() * tensor.element_size(), tensor.device))
    total = sum(n for n, _ in seen.values())
    resident = sum(n for n, where in seen.values() if _same_device(where, device))
    return total, resident


def _unsharded_bytes(model: nn.Module, total: int) -> int:
    """What FSDP2 holds gathered besides the shards: the root unit (everything outside the
    blocks, e.g. embeddings and head; FSDP2 keeps it gathered between forward and
    backward) and two blocks (the one computing and the one prefetched)."""
    sizes = [sum(p.numel() * p.element_size() for p in b.parameters()) for b in transformer_blocks(model)]
    return max(0, total - sum(sizes)) + 2 * max(sizes, default=0)


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    index = lambda d: d.index if d.index is not None else torch.cuda.current_device()  # noqa: E731
    return index(a) == index(b)


def _estimate(arch: _Arch, targets: list[Target], batch_size: int, seq_len: int, model_bytes: int, acc_bytes: int,
              layers_per_pass: int | None, on_cuda: bool, checkpointing: bool) -> tuple[int, int, int, int]:
    """(activations, device accumulators, host accumulators, passes) for one configuration.
    With gradient checkpointing the graph keeps each block's input and one block's
    activations (recomputed in the backward pass) instead of every block's, plus the inputs
    and outputs of the pass's targets, which the collection hooks keep alive."""
    tokens = batch_size * seq_len
    acc_of = lambda group: sum((t.shape_oi[0] ** 2 + t.shape_oi[1] ** 2) * acc_bytes for t in group)  # noqa: E731
    groups = layer_groups(targets, layers_per_pass)
    per_block = 10 * arch.hidden + 4 * arch.intermediate + arch.heads * seq_len
    worst = 0
    for group in groups:
        layers = [t.layer for t in group]
        first = 0 if None in layers else min(layers)
        blocks_in_graph = max(1, arch.layers - first)
        if checkpointing:
            hooked = sum(sum(t.shape_oi) for t in group)
            graph = tokens * (blocks_in_graph * arch.hidden + per_block + hooked) * model_bytes
        else:
            graph = tokens * blocks_in_graph * per_block * model_bytes
        out_grads = tokens * sum(t.shape_oi[0] for t in group) * model_bytes
        rows = tokens * max(sum(t.shape_oi) for t in group) * (model_bytes + acc_bytes)
        worst = max(worst, graph + out_grads + rows)
    logit_rows = tokens * arch.vocab if arch.vocab else batch_size * arch.labels
    activations = worst + logit_rows * (3 * model_bytes + 20)
    total_acc = acc_of(targets)
    if on_cuda:
        return activations, max(acc_of(g) for g in groups), total_acc, len(groups)
    return activations, total_acc, 0, len(groups)


def _read_meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cgroup_room() -> int | None:
    """Room left under a cgroup v2 memory limit, None without one."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def host_available_memory() -> int | None:
    """Available host RAM in bytes: psutil when installed, else `/proc/meminfo`
    `MemAvailable`, capped by the cgroup v2 limit; None when neither can be read."""
    try:
        import psutil  # noqa: PLC0415 - optional, not a dependency

        available: int | None = int(psutil.virtual_memory().available)
    except ImportError:
        available = _read_meminfo_available()
    room = _cgroup_room()
    if available is None:
        return room
    return available if room is None else min(available, room)


def available_memory(device: str | torch.device) -> int | None:
    """Free memory of a device in bytes: `torch.cuda.mem_get_info` on CUDA, available host
    RAM on CPU (see `host_available_memory`); None for other devices."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    if dev.type == "cpu":
        return host_available_memory()
    return None


def plan_memory(
    model: nn.Module,
    targets: list[Target],
    batch_size: int,
    seq_len: int,
    accumulate_dtype: str,
    layers_per_pass: int | None,
    device: str | torch.device,
    *,
    ranks_sharing_memory: int = 1,
    available_bytes: int | None = None,
    host_available_bytes: int | None = None,
    gradient_checkpointing: bool = False,
    weight_shards: int = 1,
) -> MemoryPlan:
    """Estimate the memory of a collection run and say what to change if it will not fit.

    Args:
        model: the model (only its config, parameter sizes and placement are read).
        targets: the targets to collect.
        batch_size: sequences (images) per batch.
        seq_len: tokens per sequence (for ViT-style configs the count comes from
            `image_size`/`patch_size` instead).
        accumulate_dtype: "float32" or "float64".
        layers_per_pass: blocks per pass (None: one pass).
        device: where the run accumulates.
        ranks_sharing_memory: data-parallel processes that share this device's memory
            (on CPU, the processes per host; on CUDA each rank has its own GPU: 1).
        available_bytes: free device memory; measured (`available_memory`) when None.
        host_available_bytes: available host RAM for CUDA runs; measured when None.
        gradient_checkpointing: whether blocks recompute their activations in the backward
            pass (`CollectOptions.gradient_checkpointing`).
        weight_shards: processes the weights are sharded over (`--fsdp`; 1: none).

    Returns:
        A `MemoryPlan`; `plan.fits` says whether it fits, `plan.suggestion` what to change
        (a smaller `--layers-per-pass` or `--batch-size` that fits by the same estimate,
        or, when even one block and one sequence per batch do not fit, that sharding the
        weights (FSDP) is not implemented and what else to reduce).

    Raises:
        MemoryPlanError: an unknown accumulate dtype, no targets, or a batch size, sequence
            length or `layers_per_pass` below 1.
    """
    if accumulate_dtype not in ACCUMULATE_DTYPES:
        raise MemoryPlanError(f"accumulate_dtype must be one of {sorted(ACCUMULATE_DTYPES)}, got {accumulate_dtype!r}")
    if not targets:
        raise MemoryPlanError("no targets to plan for")
    if batch_size < 1 or seq_len < 1:
        raise MemoryPlanError(f"batch_size and seq_len must be at least 1, got {batch_size} and {seq_len}")
    if layers_per_pass is not None and layers_per_pass < 1:
        raise MemoryPlanError(f"layers_per_pass must be at least 1, got {layers_per_pass}")
    dev = torch.device(device)
    on_cuda = dev.type == "cuda"
    seq_len = tokens_per_example(model, seq_len)
    arch = _arch(model, targets)
    model_bytes = next(model.parameters()).element_size()
    acc_bytes = torch.empty((), dtype=ACCUMULATE_DTYPES[accumulate_dtype]).element_size()
    weights, resident = _weights_bytes(model, dev)
    if weight_shards > 1:
        weights = -(-weights // weight_shards) + _unsharded_bytes(model, weights)
        resident = min(resident, weights)
    estimate = lambda b, k, ckpt=gradient_checkpointing: _estimate(  # noqa: E731
        arch, targets, b, seq_len, model_bytes, acc_bytes, k, on_cuda, ckpt)
    activations, accumulators, host, passes = estimate(batch_size, layers_per_pass)
    largest = max(max(t.shape_oi) for t in targets)
    plan = MemoryPlan(
        device=str(dev), batch_size=batch_size, seq_len=seq_len, accumulate_dtype=accumulate_dtype,
        layers_per_pass=layers_per_pass, passes=passes, weights_bytes=weights, resident_bytes=resident,
        activations_bytes=activations, accumulators_bytes=accumulators, host_bytes=host,
        eigh_bytes=EIGH_FACTOR * 8 * largest ** 2,
        available_bytes=available_bytes if available_bytes is not None else available_memory(dev),
        host_available_bytes=(host_available_bytes if host_available_bytes is not None
                              else host_available_memory() if on_cuda else None),
        ranks_sharing_memory=ranks_sharing_memory, weight_shards=weight_shards,
    )
    if not plan.fits:
        plan.suggestion = _suggest(plan, estimate, len(layer_groups(targets, 1)), gradient_checkpointing)
    return plan


def _suggest(plan: MemoryPlan, estimate, blocks: int, checkpointing: bool) -> str:
    """The smallest change (fewer blocks per pass, gradient checkpointing, or a smaller
    batch) that fits."""

    def fits(batch_size: int, layers_per_pass: int, ckpt: bool = checkpointing) -> bool:
        activations, accumulators, host, _ = estimate(batch_size, layers_per_pass, ckpt)
        trial = MemoryPlan(**{**plan.__dict__, "activations_bytes": activations, "accumulators_bytes": accumulators,
                              "host_bytes": host, "suggestion": ""})
        return trial.fits

    current = plan.layers_per_pass or blocks
    on_gpu = plan.device.startswith("cuda")
    if plan.host_available_bytes is not None and \
            plan.host_bytes * plan.ranks_sharing_memory > HEADROOM * plan.host_available_bytes:
        return (f"the factors of all targets need {_size(plan.host_bytes)} of host RAM per process "
                f"({_size(plan.host_available_bytes)} available): collect fewer targets per run (--layers)")
    if not fits(1, 1, True):
        activations, accumulators, _, _ = estimate(1, 1, True)
        needed = _size(plan.weights_bytes + activations + accumulators)
        return (f"even --batch-size 1 --layers-per-pass 1 --gradient-checkpointing needs about {needed}"
                f" per process (weights {_size(plan.weights_bytes)}): "
                + ("shard the weights over more GPUs (torchrun --nproc-per-node N ... --fsdp), " if on_gpu else "")
                + "use a smaller --model-dtype (bf16), fewer targets (--layers), a shorter --seq-len, "
                "fewer processes per host, or a device with more memory")
    options: list[str] = []
    smaller_k = next((k for k in range(current - 1, 0, -1) if fits(plan.batch_size, k)), None)
    if smaller_k is not None:
        options.append(f"--layers-per-pass {smaller_k}")
    if not checkpointing and fits(plan.batch_size, current, True):
        options.append("--gradient-checkpointing")
    batch = _largest_fitting(lambda b: fits(b, current), plan.batch_size - 1)
    if batch is not None:
        options.append(f"--batch-size {batch}")
    if not options:
        ckpt = checkpointing or not fits(1, 1)
        batch = _largest_fitting(lambda b: fits(b, 1, ckpt), plan.batch_size)
        options.append(f"--layers-per-pass 1 --batch-size {batch}"
                       + (" --gradient-checkpointing" * (ckpt and not checkpointing)))
    return "try " + " or ".join(options)


def _largest_fitting(fits, upper: int) -> int | None:
    """The largest b in [1, upper] with fits(b) (monotone: fits for all smaller b), or None."""
    if upper < 1 or not fits(1):
        return None
    lo, hi = 1, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
