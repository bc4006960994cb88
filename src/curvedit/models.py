"""Loading models (and their tokenizer or image processor) from a name or a directory."""

from __future__ import annotations

import contextlib
import json
import pickle
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from curvedit.errors import CurveditError
from curvedit.io import file_sha256

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
GGUF_INSTALL_HINT = "pip install 'curvedit[gguf]'"


class ModelLoadError(CurveditError):
    """A model that cannot be loaded: not a causal LM or image classifier, or a bad GGUF path or setup."""


@dataclass
class LoadedModel:
    """A model ready for curvedit, with what turns raw input into tensors.

    Attributes:
        model: the torch module, in eval mode, on its device.
        preprocessor: the tokenizer (LMs) or image processor (vision), or None.
        name: the name or path it was loaded from.
        kind: "causal-lm" or "image-classification".
        source: where the weights came from when not an HF checkpoint: for a GGUF file,
            {"format": "gguf", "file": path, "quantization": e.g. "Q4_1", "sha256": of the file}.
    """

    model: torch.nn.Module
    preprocessor: Any | None
    name: str
    kind: str
    source: dict[str, Any] | None = None


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Map a dtype name ("bf16", "float32", ...) to a torch dtype; None stays None.

    Raises:
        ModelLoadError: an unknown name.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def find_gguf(name_or_path: str | Path) -> Path | None:
    """The GGUF file a model argument names, if it names one.

    Args:
        name_or_path: a `.gguf` file, a directory, or an HF hub name.

    Returns:
        The `.gguf` file itself, or the only `.gguf` file of a directory without a `config.json`;
        None for anything else (an HF directory or a hub name).

    Raises:
        ModelLoadError: a `.gguf` path that is not a file, or a directory (without `config.json`)
            holding several `.gguf` files.
    """
    path = Path(name_or_path)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such GGUF file")
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(found) > 1:
        raise ModelLoadError(f"{path} holds {len(found)} GGUF files ({', '.join(p.name for p in found)}); "
                             "pass the one to load as --model")
    return found[0] if found else None


def _import_gguf() -> Any:
    """Import the `gguf` package, after checking `accelerate` (transformers needs both for GGUF).

    Returns:
        The `gguf` module.

    Raises:
        ModelLoadError: either package is missing; the message names the curvedit extra.
    """
    try:
        import accelerate  # noqa: F401, PLC0415 - transformers' GGUF loading needs it
        import gguf  # noqa: PLC0415
    except ImportError as err:
        raise ModelLoadError(f"loading a GGUF file needs the `gguf` and `accelerate` packages "
                             f"({err.name or err} is missing): {GGUF_INSTALL_HINT}") from None
    return gguf


def gguf_quantization(path: Path) -> str:
    """The quantization type of a GGUF file, as llama.cpp names it ("Q4_1", "Q8_0", "F16", "F32", ...).

    Args:
        path: the `.gguf` file.

    Returns:
        The name of its `general.file_type`; without a known one, the tensor type holding the
        most elements.

    Raises:
        ModelLoadError: the `gguf` package (or `accelerate`) is missing.
    """
    gguf = _import_gguf()
    reader = gguf.GGUFReader(path)
    field = reader.fields.get("general.file_type")
    if field is not None:
        value = int(field.parts[field.data[0]][0])
        if value in {t.value for t in gguf.LlamaFileType} and value != gguf.LlamaFileType.GUESSED:
            return gguf.LlamaFileType(value).name.removeprefix("ALL_").removeprefix("MOSTLY_")
    elements: Counter[str] = Counter()
    for tensor in reader.tensors:
        elements[tensor.tensor_type.name] += int(tensor.n_elements)
    return elements.most_common(1)[0][0]


def _dense_gguf_options() -> dict[str, Any]:
    """`from_pretrained` options that unpack every GGUF weight into a plain dense tensor.

    Recent transformers can keep quantized weights packed in GGUF modules (when a matmul kernel
    is available), which curvedit cannot edit; older versions always unpack and lack `GgufConfig`.
    """
    try:
        from transformers import GgufConfig  # noqa: PLC0415
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _detach_gguf_quantizer(model: torch.nn.Module) -> None:
    """Make a dequantized GGUF model save as a normal HF checkpoint.

    transformers marks a model loaded from GGUF as quantized with gguf and then refuses
    `save_pretrained`, though its weights are plain dense tensors (only `GgufConfig(dequantize=True)`,
    in versions that have it, clears the mark itself).
    """
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        model.is_quantized = False


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, Any | None, dict[str, Any]]:
    """Load a causal LM and its tokenizer from a GGUF file, dequantizing every weight to `dtype`.

    Args:
        path: the `.gguf` file.
        dtype: the dtype of the dense weights.

    Returns:
        The model (savable with `save_pretrained`), its tokenizer (None when the file's cannot be
        built) and the `LoadedModel.source` description of the file.

    Raises:
        ModelLoadError: `gguf` or `accelerate` is missing, the file is cut short or damaged, or
            transformers cannot load the file.
    """
    gguf = _import_gguf()  # fail with the install hint before transformers fails with its own
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    try:
        gguf.GGUFReader(path)
    except (ValueError, struct.error, IndexError, KeyError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{path}: not a complete GGUF file, cut short or damaged ({_first_line(err)})") from None

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                     trust_remote_code=False, **_dense_gguf_options())
    except ValueError as err:
        raise ModelLoadError(f"{path}: transformers cannot load this GGUF file ({err})") from None
    _detach_gguf_quantizer(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    source = {"format": "gguf", "file": str(path), "quantization": gguf_quantization(path),
              "sha256": file_sha256(path)}
    return model, tokenizer, source


def _first_line(err: BaseException) -> str:
    """The first non-blank line of an exception's message (transformers' run over several)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _check_model_path(name_or_path: str | Path) -> bool:
    """Refuse a model argument that names a local path curvedit cannot load, before
    transformers turns it into a hub request or a confusing message.

    Returns:
        True for an existing local folder, False for a hub name.

    Raises:
        ModelLoadError: a path that does not exist (an absolute path, or one starting with `.`
            or `~`, or with more than one `/`: never a hub name), a file that is not `.gguf`, a
            folder without `config.json` (e.g. only a pickled `pytorch_model.bin`), a
            `config.json` that is not a JSON object, or one that needs the folder's own code
            (`auto_map`: curvedit passes `trust_remote_code=False` everywhere and never prompts).
    """
    path = Path(name_or_path)
    text = str(name_or_path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            held = sorted(p.name for p in path.iterdir())
            shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "") if held else "nothing"
            raise ModelLoadError(f"{path}: not an HF model folder (no config.json; it holds {shown}); give a folder "
                                 "written by save_pretrained, a .gguf file, or a hub name")
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ModelLoadError(f"{path / 'config.json'}: not valid JSON ({err})") from None
        if not isinstance(config, dict):
            raise ModelLoadError(f"{path / 'config.json'}: expected a JSON object")
        if config.get("auto_map"):
            raise ModelLoadError(f"{path}: its config.json needs the folder's own Python code (auto_map: "
                                 f"{', '.join(sorted(config['auto_map']))}); curvedit never runs a model folder's "
                                 "code: use a model transformers supports natively")
        return True
    if path.exists():
        raise ModelLoadError(f"{path}: a file, not a model; give an HF model folder, a .gguf file or a hub name")
    if path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1 or "\\" in text:
        raise ModelLoadError(f"{name_or_path}: no such model folder or file")
    return False


@contextlib.contextmanager
def _loading_bars(progress: bool) -> Iterator[None]:
    """Transformers' loading progress bars on (as they are) or off for the block."""
    if progress:
        yield
        return
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def load_model(name_or_path: str | Path, *, device: str = "cpu", dtype: str | torch.dtype | None = None,
               progress: bool = True) -> LoadedModel:
    """Load a causal LM or an image classifier with `from_pretrained`, or a causal LM from GGUF.

    Args:
        name_or_path: an HF hub name (needs network access), a local HF directory, a `.gguf`
            file, or a directory holding one `.gguf` file and no `config.json`.
        device: where to put the model ("cpu", "cuda", "cuda:1", ...).
        dtype: weight dtype ("bf16", "fp16", "float32"); None keeps the stored one, or float32
            for GGUF (whose quantized weights are unpacked into it).
        progress: show transformers' loading progress bars (False hides them).

    Returns:
        A `LoadedModel`; its preprocessor is None when none is stored with the model, and its
        source describes the GGUF file when loaded from one.

    Raises:
        ModelLoadError: no such folder or file; a folder without `config.json`; a `config.json`
            or weights file that cannot be read; a hub name that cannot be fetched; the config is
            neither a causal LM nor an image classifier; an unknown dtype; a bad GGUF path (see
            `find_gguf`); GGUF support is not installed; transformers cannot load the GGUF file.
    """
    with _loading_bars(progress):
        return _load_model(name_or_path, device=device, dtype=dtype)


def _load_model(name_or_path: str | Path, *, device: str = "cpu",
                dtype: str | torch.dtype | None = None) -> LoadedModel:
    """`load_model` without the progress switch."""
    gguf_file = find_gguf(name_or_path)
    if gguf_file is not None:
        model, tokenizer, source = _load_gguf(gguf_file, resolve_dtype(dtype) or torch.float32)
        model.to(device).eval()
        return LoadedModel(model=model, preprocessor=tokenizer, name=str(name_or_path), kind="causal-lm",
                           source=source)
    from safetensors import SafetensorError  # noqa: PLC0415
    from transformers import (  # noqa: PLC0415 - keep `import curvedit` light
        AutoConfig,
        AutoImageProcessor,
        AutoModelForCausalLM,
        AutoModelForImageClassification,
        AutoTokenizer,
    )

    local = _check_model_path(name_or_path)
    kwargs = {"dtype": resolve_dtype(dtype)} if dtype is not None else {}
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=False)
    except (OSError, ValueError) as err:
        if local:
            raise ModelLoadError(f"{Path(name_or_path) / 'config.json'}: not usable ({_first_line(err)})") from None
        raise ModelLoadError(f"{name_or_path}: no such local folder, and it cannot be loaded from the Hugging Face "
                             f"hub ({_first_line(err)})") from None
    architectures = " ".join(getattr(config, "architectures", None) or [])
    try:
        if "ImageClassification" in architectures:
            model = AutoModelForImageClassification.from_pretrained(name_or_path, trust_remote_code=False, **kwargs)
            kind, loader = "image-classification", AutoImageProcessor
        else:
            try:
                model = AutoModelForCausalLM.from_pretrained(name_or_path, trust_remote_code=False, **kwargs)
            except ValueError as err:
                raise ModelLoadError(f"{name_or_path}: not a causal LM or an image classifier "
                                     f"({_first_line(err)})") from None
            kind, loader = "causal-lm", AutoTokenizer
    except (OSError, SafetensorError, pickle.UnpicklingError) as err:
        raise ModelLoadError(f"{name_or_path}: cannot load the weights ({_first_line(err)})") from None
    try:
        preprocessor = loader.from_pretrained(name_or_path, trust_remote_code=False)
    except (OSError, ValueError, TypeError):
        preprocessor = None
    model.to(device).eval()
    return LoadedModel(model=model, preprocessor=preprocessor, name=str(name_or_path), kind=kind)


_CONTEXT_ATTRIBUTES = ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length")


def context_window(model: torch.nn.Module) -> int | None:
    """The longest sequence the model accepts, read from its config.

    Args:
        model: an HF causal LM (or any module with a `config`).

    Returns:
        The first of `n_positions`, `max_position_embeddings`, `n_ctx`,
        `max_sequence_length`, `seq_length` that the config sets; None if none is set.
    """
    config = getattr(model, "config", None)
    for name in _CONTEXT_ATTRIBUTES:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextlib.contextmanager
def restored(model: torch.nn.Module, parameters: Iterable[torch.Tensor] | None = None) -> Iterator[None]:
    """Within the block the model may be trained or changed; afterwards it is what it was.

    Args:
        model: the model.
        parameters: the tensors to snapshot and restore (a edit's target weights, say); None:
            every parameter and buffer of `model`. The train/eval mode is restored either way.

    Yields:
        Nothing; the snapshot is restored when the block ends, also on an exception.
    """
    was_training = model.training
    if parameters is None:
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    else:
        tensors = list(parameters)
        copies = [p.detach().clone() for p in tensors]
    try:
        yield
    finally:
        if parameters is None:
            model.load_state_dict(saved)
        else:
            with torch.no_grad():
                for tensor, copy in zip(tensors, copies):
                    tensor.copy_(copy)
        model.train(was_training)
