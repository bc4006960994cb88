"""Loading models (and their tokenizer or image processor) from a name or a directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready for curvedit, with what turns raw input into tensors.

    Attributes:
        model: the torch module, in eval mode, on its device.
        preprocessor: the tokenizer (LMs) or image processor (vision), or None.
        name: the name or path it was loaded from.
        kind: "causal-lm" or "image-classification".
    """

    model: torch.nn.Module
    preprocessor: Any | None
    name: str
    kind: str


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Map a dtype name ("bf16", "float32", ...) to a torch dtype; None stays None.

    Raises:
        ValueError: an unknown name.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def load_model(name_or_path: str | Path, *, device: str = "cpu", dtype: str | torch.dtype | None = None) -> LoadedModel:
    """Load a causal LM or an image classifier with `from_pretrained`.

    Args:
        name_or_path: an HF hub name (needs network access) or a local directory.
        device: where to put the model ("cpu", "cuda", "cuda:1", ...).
        dtype: weight dtype ("bf16", "fp16", "float32"); None keeps the stored one.

    Returns:
        A `LoadedModel`; its preprocessor is None when none is stored with the model.

    Raises:
        ValueError: the config is neither a causal LM nor an image classifier.
    """
    from transformers import (  # noqa: PLC0415 - keep `import curvedit` light
        AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageClassification, AutoTokenizer)

    config = AutoConfig.from_pretrained(name_or_path)
    architectures = " ".join(getattr(config, "architectures", None) or [])
    kwargs = {"dtype": resolve_dtype(dtype)} if dtype is not None else {}
    if "ImageClassification" in architectures:
        model = AutoModelForImageClassification.from_pretrained(name_or_path, **kwargs)
        kind, loader = "image-classification", AutoImageProcessor
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
        except ValueError as err:
            raise ValueError(f"{name_or_path}: not a causal LM or an image classifier ({err})") from None
        kind, loader = "causal-lm", AutoTokenizer
    try:
        preprocessor = loader.from_pretrained(name_or_path)
    except (OSError, ValueError, TypeError):
        preprocessor = None
    model.to(device).eval()
    return LoadedModel(model=model, preprocessor=preprocessor, name=str(name_or_path), kind=kind)
