"""How a batch becomes a loss and the mask of positions that count for the factors.

Every objective returns the *summed* loss over its counted terms (no mean), so that the
gradient at a position is the gradient of its sequence's summed loss, and the factors do
not depend on batch size or padding. Labels are sampled from the model's own predictive
distribution ("sampled": the true Fisher, the paper's choice) or taken from the data
("gold": the empirical Fisher).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from curvedit.errors import CurveditError

LABEL_MODES = ("sampled", "gold")


class ObjectiveError(CurveditError):
    """A batch the objective cannot turn into a loss."""


@dataclass
class ObjectiveOutput:
    """What one forward pass gives the collector.

    Attributes:
        loss: the summed loss over counted terms (a scalar that requires grad).
        positions_mask: bool mask over the leading dims of every target's input/output
            (e.g. `(B, T)`): the positions whose `x` and `g` enter the factors.
    """

    loss: torch.Tensor
    positions_mask: torch.Tensor


class Objective(Protocol):
    """Turns a batch into an `ObjectiveOutput` by running the model forward."""

    def __call__(self, model: nn.Module, batch: dict, generator: torch.Generator) -> ObjectiveOutput:
        """The per-position loss and mask of `batch` (labels drawn with `generator` when sampled)."""


def summed_nll(logits: torch.Tensor, gold: torch.Tensor | None, label_mode: str,
               generator: torch.Generator) -> torch.Tensor:
    """Sum of `-log p(label)` over rows of `logits` `(N, V)`, with sampled or gold labels.

    Args:
        logits: `(N, V)` logits of the counted terms only.
        gold: `(N,)` gold labels (needed for "gold").
        label_mode: "sampled" or "gold".
        generator: the RNG for sampled labels (on the logits' device).

    Returns:
        A scalar: the summed negative log-likelihood, computed in float32 or better.

    Raises:
        ObjectiveError: an unknown label mode or gold labels missing.
    """
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    if label_mode == "sampled":
        labels = sample_categorical(logp.detach(), generator)
    elif label_mode == "gold":
        if gold is None:
            raise ObjectiveError("label mode 'gold' needs labels in the batch")
        labels = gold
    else:
        raise ObjectiveError(f"unknown label mode {label_mode!r}; choose one of {LABEL_MODES}")
    return -logp.gather(-1, labels[:, None]).sum()


def sample_categorical(logp: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw one label per row of log-probabilities `(N, V)` by inverting the CDF.

    One uniform draw per row and a binary search: several times faster than
    `torch.multinomial`, which draws V exponentials per row.
    """
    cdf = logp.exp().cumsum(dim=-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1).squeeze(-1)


@dataclass
class CausalLMObjective:
    """Next-token prediction. A position counts when it has a next token and neither it nor
    that next token is padding; so the last position of each sequence never counts.

    Attributes:
        label_mode: "sampled" (true Fisher) or "gold" (empirical Fisher).
    """

    label_mode: str = "sampled"

    def __call__(self, model: nn.Module, batch: dict, generator: torch.Generator) -> ObjectiveOutput:
        """The next-token loss of every real position, with labels sampled from the model or gold."""
        ids_bt = batch["input_ids"]
        attn_bt = batch.get("attention_mask")
        if attn_bt is None:
            attn_bt = torch.ones_like(ids_bt)
        if ids_bt.shape[1] < 2:
            raise ObjectiveError("causal LM sequences need at least 2 tokens")
        real_bt = attn_bt.bool()
        counted_bt = torch.zeros_like(real_bt)
        counted_bt[:, :-1] = real_bt[:, :-1] & real_bt[:, 1:]
        position_ids = (attn_bt.long().cumsum(-1) - 1).clamp(min=0)
        logits_btv = model(input_ids=ids_bt, attention_mask=attn_bt, position_ids=position_ids,
                          use_cache=False).logits
        gold_bt = torch.roll(ids_bt, shifts=-1, dims=1)
        loss = summed_nll(logits_btv[counted_bt], gold_bt[counted_bt], self.label_mode, generator)
        return ObjectiveOutput(loss=loss, positions_mask=counted_bt)


@dataclass
class ImageClassificationObjective:
    """Image classification (transformers ViT and alike): one loss term per image.

    Attributes:
        label_mode: "sampled" or "gold" (gold reads `batch["labels"]`).
        positions: "cls" counts the CLS token (position 0) only, as the paper does;
            "all" counts every token position.
    """

    label_mode: str = "sampled"
    positions: str = "cls"

    def __call__(self, model: nn.Module, batch: dict, generator: torch.Generator) -> ObjectiveOutput:
        """The classification loss at the CLS token (or every position), labels sampled or gold."""
        if self.positions not in ("cls", "all"):
            raise ObjectiveError(f"positions must be 'cls' or 'all', got {self.positions!r}")
        pixels = batch["pixel_values"]
        logits_bc = model(pixel_values=pixels).logits
        loss = summed_nll(logits_bc, batch.get("labels"), self.label_mode, generator)
        tokens = _vit_sequence_length(model, pixels)
        mask_bt = torch.zeros((pixels.shape[0], tokens), dtype=torch.bool, device=pixels.device)
        if self.positions == "cls":
            mask_bt[:, 0] = True
        else:
            mask_bt[:] = True
        return ObjectiveOutput(loss=loss, positions_mask=mask_bt)


def _vit_sequence_length(model: nn.Module, pixels: torch.Tensor) -> int:
    config = model.config
    patch = config.patch_size
    height, width = pixels.shape[-2:]
    return (height // patch) * (width // patch) + 1


@dataclass
class CustomObjective:
    """Any model: a user function gives per-position logits and the counted mask.

    Attributes:
        forward: `forward(model, batch) -> (logits (*S, V), mask (*S) bool)`. `S` must be the
            leading dims of the targets' inputs (e.g. `(B, T)`). Gold labels, if used,
            are `batch["labels"]` of shape `S`.
        label_mode: "sampled" or "gold".
    """

    forward: Callable[[nn.Module, dict], tuple[torch.Tensor, torch.Tensor]]
    label_mode: str = "sampled"

    def __call__(self, model: nn.Module, batch: dict, generator: torch.Generator) -> ObjectiveOutput:
        """The loss of the user's `forward` logits and mask, labels sampled or gold."""
        logits, mask = self.forward(model, batch)
        mask = mask.bool()
        if logits.shape[:-1] != mask.shape:
            raise ObjectiveError(f"logits {tuple(logits.shape)} do not match mask {tuple(mask.shape)} + (V,)")
        gold = batch.get("labels")
        loss = summed_nll(logits[mask], gold[mask] if gold is not None else None, self.label_mode, generator)
        return ObjectiveOutput(loss=loss, positions_mask=mask)
