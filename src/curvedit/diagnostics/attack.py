"""Does the edit last? Durability attacks on an edited model (`curvedit attack`).

- **Relearning** (`relearn_curve`): fine-tune every weight of the model (AdamW, seeded data
  order, gradient clipping) on some text, and measure after 0, 10, 30, 100, ... steps.
  The text may hold no memorized window (general text: does recall come back by itself?),
  the tune half of the memorized set (a relearning attack: does learning half bring back the
  other half?), or paraphrases / partial copies.
- **Quantization** (`quantize_rtn`, `quantized`): round-to-nearest, symmetric, per output
  channel in groups of `group_size` inputs (int8 and 4-bit), of every Linear/Conv1D weight
  inside the transformer blocks; quantization is known to bring back some unlearned
  knowledge (Zhang et al. 2024).

Both measure with a caller's function (recall of held-out memorized windows, perplexity), and
leave the model as they found it.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from curvedit.data import pad_batch
from curvedit.errors import CurveditError
from curvedit.evaluate.memorization import evaluate_recitation
from curvedit.evaluate.perplexity import perplexity
from curvedit.kfac.targets import Target, TargetSpec, select_targets
from curvedit.models import model_device, restored


class AttackError(CurveditError):
    """An attack that cannot run as asked (no data, bad steps or bits)."""


@dataclass(frozen=True)
class RelearnOptions:
    """Settings of a relearning attack.

    Attributes:
        steps: optimizer steps after which to measure (ascending; 0 = before any step).
        lr: AdamW learning rate (constant).
        batch_size: sequences per step.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient clipping (None: none).
        seed: data order seed.
        progress: show a progress bar.
    """

    steps: tuple[int, ...] = (0, 10, 30, 100)
    lr: float = 1e-4
    batch_size: int = 8
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        """Raise AttackError for empty, negative or unsorted steps, or a bad lr / batch size."""
        if not self.steps or any(s < 0 for s in self.steps) or list(self.steps) != sorted(set(self.steps)):
            raise AttackError(f"--steps must be distinct non-negative counts in ascending order, got {self.steps}")
        if not (self.lr > 0 and self.lr < float("inf")):
            raise AttackError(f"the learning rate must be a positive number, got {self.lr}")
        if self.batch_size < 1:
            raise AttackError(f"batch_size must be at least 1, got {self.batch_size}")


def _lm_loss(model: nn.Module, chunk: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    batch = pad_batch(chunk, pad_id, padding_side="right")
    device = model_device(model)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)


def relearn_curve(model: nn.Module, sequences: Sequence[Sequence[int]], measure: Callable[[nn.Module], dict[str, Any]],
                  options: RelearnOptions | None = None, *, pad_id: int = 0) -> list[dict[str, Any]]:
    """Fine-tune on `sequences` and measure after each count of `options.steps`.

    Args:
        model: the model to attack (restored afterwards).
        sequences: the attacker's training sequences (cycled in a seeded order).
        measure: model -> metrics (called in eval mode, under no grad).
        options: steps, learning rate, batch size, seed.
        pad_id: padding id.

    Returns:
        One row per entry of `options.steps`: `{"step": s, "loss": last training loss or
        None, **measure(model)}`.

    Raises:
        AttackError: invalid options, no sequence of 2+ tokens, or a loss that is not finite
            (the fine-tuning diverged; the model is restored).
    """
    options = options or RelearnOptions()
    options.validate()
    usable = [list(s) for s in sequences if len(s) >= 2]
    if not usable:
        raise AttackError("the relearning data holds no sequence of 2 or more tokens")
    rng = random.Random(options.seed)
    order: list[int] = []
    rows: list[dict[str, Any]] = []
    loss_value: float | None = None
    with restored(model):
        optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
        done = 0
        bar = tqdm(total=options.steps[-1], unit="step", desc="relearn", disable=not options.progress)
        for target_step in options.steps:
            model.train()
            while done < target_step:
                if len(order) < options.batch_size:
                    block = list(range(len(usable)))
                    rng.shuffle(block)
                    order += block
                chunk, order = [usable[i] for i in order[: options.batch_size]], order[options.batch_size:]
                loss = _lm_loss(model, chunk, pad_id)
                if not torch.isfinite(loss):
                    raise AttackError(f"the relearning loss is {float(loss.detach())} at step {done}: the run diverged "
                                      "(lower --lr); nothing was measured past it")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if options.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), options.max_grad_norm)
                optimizer.step()
                loss_value = float(loss.detach())
                done += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}")
            model.eval()
            with torch.no_grad():
                rows.append({"step": target_step, "loss": loss_value, **measure(model)})
        bar.close()
    return rows


def quantize_rtn(weight_oi: torch.Tensor, bits: int, group_size: int | None = 128) -> torch.Tensor:
    """Round-to-nearest symmetric quantization, dequantized back to the weight's dtype.

    Each output channel (row) is cut into groups of `group_size` inputs (None: the whole
    row); a group's scale is `max |w| / (2^(bits-1) - 1)` and its values are
    `clamp(round(w / scale), -2^(bits-1), 2^(bits-1) - 1) * scale`.

    Args:
        weight_oi: `(d_out, d_in)` weight.
        bits: 2 to 16.
        group_size: inputs per group (the last group of a row may be shorter).

    Returns:
        The quantized-dequantized weight, same shape and dtype.

    Raises:
        AttackError: bits outside [2, 16] or a group size below 1.
    """
    if not 2 <= bits <= 16:
        raise AttackError(f"bits must be in [2, 16], got {bits}")
    if group_size is not None and group_size < 1:
        raise AttackError(f"group size must be at least 1, got {group_size}")
    d_out, d_in = weight_oi.shape
    size = d_in if group_size is None else min(group_size, d_in)
    pad = (-d_in) % size
    w = F.pad(weight_oi.float(), (0, pad)).view(d_out, -1, size)
    qmax = 2 ** (bits - 1) - 1
    scale = (w.abs().amax(dim=-1, keepdim=True) / qmax).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.clamp(torch.round(w / scale), -qmax - 1, qmax) * scale
    return q.view(d_out, -1)[:, :d_in].to(weight_oi.dtype)


def block_weights(model: nn.Module) -> list[Target]:
    """Every Linear/Conv1D weight inside the transformer blocks (embeddings and head excluded)."""
    return [t for t in select_targets(model, TargetSpec()) if t.layer is not None]


@contextlib.contextmanager
def quantized(model: nn.Module, bits: int, group_size: int | None = 128) -> Iterator[list[Target]]:
    """Within the block, the block weights are RTN-quantized (`quantize_rtn`); restored after."""
    targets = block_weights(model)
    originals = {t.name: t.module.weight.detach().clone() for t in targets}
    try:
        with torch.no_grad():
            for target in targets:
                target.set_weight_oi(quantize_rtn(target.weight_oi().detach(), bits, group_size))
        yield targets
    finally:
        with torch.no_grad():
            for target in targets:
                target.module.weight.copy_(originals[target.name])


def quantization_rows(model: nn.Module, measure: Callable[[nn.Module], dict[str, Any]], bits: Sequence[int],
                      group_size: int | None = 128) -> list[dict[str, Any]]:
    """`measure` of the model as it is (bits None) and RTN-quantized at each of `bits`."""
    with torch.no_grad():
        rows = [{"bits": None, **measure(model)}]
        for b in bits:
            with quantized(model, b, group_size):
                rows.append({"bits": b, "group_size": group_size, **measure(model)})
    return rows


def recall_and_perplexity(model: nn.Module, windows: Sequence[Any], sequences: Sequence[Sequence[int]] | None, *,
                          pad_id: int = 0, batch_size: int = 16) -> dict[str, Any]:
    """What an attack is judged by: greedy recitation of the windows (strict, loose, distance,
    with 95% intervals) and, when `sequences` are given, held-out perplexity with its interval."""
    result, _ = evaluate_recitation(model, windows, pad_id=pad_id, batch_size=batch_size)
    row: dict[str, Any] = {"n": result.n, "strict": result.strict, "loose": result.loose,
                           "distance": result.avg_normalized_distance,
                           **{f"{k}_ci": interval for k, interval in result.intervals().items()}}
    if sequences:
        ppl = perplexity(model, sequences, pad_id=pad_id, batch_size=batch_size)
        row["perplexity"], row["perplexity_ci"] = ppl.perplexity, ppl.interval().to_dict()
    return row
