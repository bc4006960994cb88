"""Switch off a whole sublayer (one block's attention or MLP) to see what a network uses.

An ablated sublayer adds nothing to the residual stream: its output projection (attention:
`o_proj` / `attention.output.dense` / `attn.c_proj`; MLP: `fc2` / `down_proj` / `c_proj` /
`N.output.dense`) returns zeros, bias included, through a forward hook that is removed on exit.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from curvedit.errors import CurveditError

SUBLAYERS = ("attention", "mlp")
_PATTERNS = {
    "attention": re.compile(r"(?:^|\.)(\d+)\.(?:attention\.(?:o_proj|output\.dense)|self_attn\.o_proj|attn\.c_proj)$"),
    "mlp": re.compile(r"(?:^|\.)(\d+)\.(?:mlp\.(?:fc2|down_proj|c_proj)|output\.dense)$"),
}


class AblationError(CurveditError):
    """An ablation that cannot be done: an unknown sublayer kind or a block the model lacks."""


def sublayer_outputs(model: nn.Module) -> dict[tuple[str, int], nn.Module]:
    """The output projection of every block's attention and MLP.

    Args:
        model: a transformer (HF ViT, BERT, GPT-2, Llama-style names).

    Returns:
        (kind, block index) -> the module whose output is the sublayer's contribution.
    """
    found: dict[tuple[str, int], nn.Module] = {}
    for name, module in model.named_modules():
        for kind, pattern in _PATTERNS.items():
            match = pattern.search(name)
            if match:
                found[(kind, int(match.group(1)))] = module
    return found


def _zero_output(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(output)


@contextmanager
def ablated(model: nn.Module, kind: str, block: int) -> Iterator[nn.Module]:
    """Within the block, `model` runs with `kind` ("attention" or "mlp") of `block` switched off.

    Args:
        model: the model (its weights are not touched).
        kind: "attention" or "mlp".
        block: the block index.

    Yields:
        The output projection that is silenced.

    Raises:
        AblationError: an unknown kind, or no such sublayer in the model.
    """
    if kind not in SUBLAYERS:
        raise AblationError(f"unknown sublayer {kind!r}; choose one of {SUBLAYERS}")
    outputs = sublayer_outputs(model)
    if (kind, block) not in outputs:
        blocks = sorted(b for k, b in outputs if k == kind)
        raise AblationError(f"the model has no {kind} in block {block} (blocks with one: {blocks})")
    module = outputs[(kind, block)]
    handle = module.register_forward_hook(_zero_output)
    try:
        yield module
    finally:
        handle.remove()
