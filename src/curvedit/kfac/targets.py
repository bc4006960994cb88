"""Which weights to collect factors for and edit, and a uniform (d_out, d_in) view of each.

A target is a module whose weight acts as `y = W x` with `W` of shape `(d_out, d_in)`:
`torch.nn.Linear` (weight stored `(d_out, d_in)`) or transformers' `Conv1D` (GPT-2 and
friends; weight stored transposed, `(d_in, d_out)`). Targets are chosen by glob or regex
patterns on module names, by presets per model family, and by a layer range.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from curvedit.errors import CurveditError

# Module-name regexes for the MLP matrices of common families. "in" matrices read the
# residual stream (gate/up, fc1), "out" matrices write back to it (down, fc2).
_MLP_IN = [
    r"mlp\.(gate_proj|up_proj)",  # Llama, OLMo-2, Qwen, Mistral
    r"mlp\.c_fc",  # GPT-2
    r"mlp\.dense_h_to_4h",  # GPT-NeoX, Pythia
    r"mlp\.fc_in", r"mlp\.fc1",  # GPT-J, OPT-style
    r"layer\.\d+\.intermediate\.dense",  # ViT, BERT
]
_MLP_OUT = [
    r"mlp\.down_proj",
    r"mlp\.c_proj",
    r"mlp\.dense_4h_to_h",
    r"mlp\.fc_out", r"mlp\.fc2",
    r"layer\.\d+\.output\.dense",  # ViT/BERT MLP output (not attention.output.dense)
]


def _preset_regex(parts: list[str]) -> str:
    return r"(^|\.)(" + "|".join(parts) + r")$"


PRESETS: dict[str, str] = {
    "mlp": _preset_regex(_MLP_IN + _MLP_OUT),
    "mlp-in": _preset_regex(_MLP_IN),
    "mlp-out": _preset_regex(_MLP_OUT),
}

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


class TargetError(CurveditError):
    """A target specification that selects nothing or cannot be used."""


@dataclass(frozen=True)
class TargetSpec:
    """How to choose target weights.

    Attributes:
        patterns: module-name patterns; glob (`*.mlp.c_fc`) unless prefixed `re:` (regex,
            searched). Empty means "every supported module".
        preset: a key of `PRESETS` ("mlp", "mlp-in", "mlp-out"), combined with patterns by
            union; None for none.
        layers: a layer selection like "23-25" or "0,3,5-7"; None for all layers.
    """

    patterns: tuple[str, ...] = ()
    preset: str | None = None
    layers: str | None = None


@dataclass(frozen=True)
class Target:
    """One target weight seen as `(d_out, d_in)` whatever its module type.

    Attributes:
        name: the module name in `model.named_modules()`.
        module: the `nn.Linear` or `Conv1D` module.
        layer: the block index parsed from the name, or None.
    """

    name: str
    module: nn.Module
    layer: int | None

    @property
    def transposed(self) -> bool:
        """Whether the module stores its weight as `(d_in, d_out)` (transformers Conv1D)."""
        return isinstance(self.module, Conv1D)

    @property
    def shape_oi(self) -> tuple[int, int]:
        """`(d_out, d_in)`."""
        rows, cols = self.module.weight.shape
        return (cols, rows) if self.transposed else (rows, cols)

    def weight_oi(self) -> torch.Tensor:
        """The weight as a `(d_out, d_in)` view (no copy)."""
        weight = self.module.weight
        return weight.T if self.transposed else weight

    @torch.no_grad()
    def set_weight_oi(self, new_oi: torch.Tensor) -> None:
        """Overwrite the weight in place from a `(d_out, d_in)` tensor, in the weight's dtype.

        Raises:
            TargetError: the new tensor's shape is not `(d_out, d_in)`.
        """
        if tuple(new_oi.shape) != self.shape_oi:
            raise TargetError(f"{self.name}: new weight has shape {tuple(new_oi.shape)}, expected {self.shape_oi}")
        self.weight_oi().copy_(new_oi.to(self.module.weight.dtype))


def supported(module: nn.Module) -> bool:
    """Whether curvedit can treat this module as a target."""
    return isinstance(module, (nn.Linear, Conv1D))


def layer_index(name: str) -> int | None:
    """The block index in a module name (`model.layers.23.mlp.up_proj` -> 23), or None."""
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def parse_layers(spec: str) -> set[int]:
    """Parse "23-25" or "0,3,5-7" into a set of ints.

    Raises:
        TargetError: a malformed range.
    """
    layers: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise TargetError(f"bad layer range {spec!r}: use forms like '23-25' or '0,3,5-7'")
        lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
        if hi < lo:
            raise TargetError(f"bad layer range {part!r}: end before start")
        layers.update(range(lo, hi + 1))
    return layers


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def select_targets(model: nn.Module, spec: TargetSpec) -> list[Target]:
    """Resolve a `TargetSpec` on a model, in module order.

    Args:
        model: the model to search.
        spec: patterns, preset and layers.

    Returns:
        The selected targets (at least one).

    Raises:
        TargetError: an unknown preset, a bad layer range, or nothing selected (the
            message lists module names that do exist).
    """
    if spec.preset is not None and spec.preset not in PRESETS:
        raise TargetError(f"unknown preset {spec.preset!r}; choose one of {sorted(PRESETS)}")
    patterns = list(spec.patterns)
    if spec.preset is not None:
        patterns.append("re:" + PRESETS[spec.preset])
    layers = parse_layers(spec.layers) if spec.layers else None
    candidates = [(name, mod) for name, mod in model.named_modules() if supported(mod)]
    chosen = [
        Target(name=name, module=mod, layer=layer_index(name))
        for name, mod in candidates
        if (not patterns or any(_matches(name, p) for p in patterns))
        and (layers is None or layer_index(name) in layers)
    ]
    if not chosen:
        shown = ", ".join(name for name, _ in candidates[:12])
        more = f" (and {len(candidates) - 12} more)" if len(candidates) > 12 else ""
        raise TargetError(
            f"no Linear/Conv1D module matches patterns={spec.patterns or '()'} preset={spec.preset} "
            f"layers={spec.layers}; modules that exist: {shown}{more}"
        )
    return chosen
