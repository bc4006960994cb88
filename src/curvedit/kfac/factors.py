"""The factor files: K-FAC factors per target, their identity, load/save/merge/validate.

On disk (format version 2; version 1 files, which cannot hold `NAME.S`, are still read), a
directory with:
- `factors.safetensors`: for each target module name `NAME`, `NAME.A` (`d_in x d_in`) and
  `NAME.G` (`d_out x d_out`), the *means* of `x x^T` and `g g^T` over the target's counted
  positions; after `collect --eigencorrect`, also `NAME.S` (`d_out x d_in`), the
  eigenvalue-corrected masses `mean (u_i^T g)^2 (v_j^T x)^2` in the eigenbasis of A and G
  (see `curvedit.kfac.eigencorrect`).
- `factors.json`: `format_version`, `curvedit_version`, `model` (`name`, `config_hash`,
  `weights_hash`), `collection` (label mode, dtype, seq len, data description, ...), and
  `targets`: per `NAME`, `d_in`, `d_out`, `positions`, `weight_sha256`, `transposed`, `sha256`
  (the SHA-256 of each of its tensors' bytes, checked on load), and with
  `NAME.S` an `eigencorrected` entry: the positions it averages and the SHA-256 of the
  eigenbasis it was measured in (`basis_sha256`).
  The same description is stored in the safetensors header (key "curvedit"), which is the
  one `load_factors` trusts; the JSON file is its readable copy and must agree with it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from curvedit import __version__
from curvedit.errors import CurveditError
from curvedit.io import digest, safetensors_metadata, write_json, write_safetensors
from curvedit.kfac.targets import Target

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
FACTORS_FILE = "factors.safetensors"
META_FILE = "factors.json"
HEADER_KEY = "curvedit"
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures"}


class FactorError(CurveditError):
    """Factor files that are missing, malformed or do not belong to the model at hand."""


@dataclass
class TargetFactors:
    """The K-FAC factors of one target.

    Attributes:
        A: `(d_in, d_in)` mean of `x x^T` over counted positions.
        G: `(d_out, d_out)` mean of `g g^T` over counted positions.
        positions: the number of counted positions.
        weight_sha256: hash of the target weight (as float32 `(d_out, d_in)`) at collection.
        transposed: whether the module stores its weight transposed (Conv1D).
        S: `(d_out, d_in)` eigenvalue-corrected masses in the eigenbasis of G and A, or None.
        S_positions: the positions S averages.
        S_basis_sha256: SHA-256 of the eigenbasis S was measured in (`basis_sha256`).
    """

    A: torch.Tensor
    G: torch.Tensor
    positions: int
    weight_sha256: str = ""
    transposed: bool = False
    S: torch.Tensor | None = None
    S_positions: int = 0
    S_basis_sha256: str = ""

    @property
    def d_in(self) -> int:
        """Input dimension of the weight (the side of A)."""
        return self.A.shape[0]

    @property
    def d_out(self) -> int:
        """Output dimension of the weight (the side of G)."""
        return self.G.shape[0]


@dataclass
class FactorSet:
    """Factors for a set of targets plus the description of how they were made.

    Attributes:
        targets: module name -> `TargetFactors`, in module order.
        model: model identity (`name`, `config_hash`, `weights_hash`).
        collection: how the factors were collected (label mode, dtype, data, ...).
    """

    targets: dict[str, TargetFactors]
    model: dict[str, Any] = field(default_factory=dict)
    collection: dict[str, Any] = field(default_factory=dict)


def weight_sha256(target: Target) -> str:
    """SHA-256 of a target's weight as contiguous float32 `(d_out, d_in)` bytes.

    Hashing float32 makes a bf16 model and its exact float32 upcast agree. A weight
    sharded by FSDP (a DTensor) is gathered first: every rank must call this together.
    """
    weight = target.weight_oi().detach()
    if hasattr(weight, "full_tensor"):  # torch.distributed.tensor.DTensor
        weight = weight.full_tensor()
    weight = weight.to("cpu", torch.float32).contiguous()
    return hashlib.sha256(weight.numpy().tobytes()).hexdigest()


def config_hash(model: nn.Module) -> str:
    """SHA-256 of the model config without fields that do not change the function."""
    config = getattr(model, "config", None)
    if config is None:
        return ""
    data = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return digest(data)


def model_identity(model: nn.Module, targets: list[Target], name: str | None = None) -> dict[str, Any]:
    """Describe a model for the factor files: name, config hash, hash of target weights."""
    combined = hashlib.sha256()
    for target in targets:
        combined.update(target.name.encode())
        combined.update(weight_sha256(target).encode())
    if name is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return {"name": name, "config_hash": config_hash(model), "weights_hash": combined.hexdigest()}


SYMMETRY_TOL = 1e-4  # largest |M - M^T| allowed, relative to the largest |M|


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes as stored (contiguous, on the CPU)."""
    return hashlib.sha256(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _check_tensor(root: Path, key: str, tensor: torch.Tensor, expected: str | None, square: bool) -> None:
    """Refuse a factor tensor that differs from its checksum, or a factor that is not symmetric."""
    if expected is not None and tensor_sha256(tensor) != expected:
        raise FactorError(f"{root}: tensor {key} does not match the checksum stored with it (the file was altered "
                          "or damaged); collect again")
    if square and tensor.numel():
        scale = float(tensor.abs().max())
        if float((tensor - tensor.T).abs().max()) > SYMMETRY_TOL * max(scale, 1e-30):
            raise FactorError(f"{root}: factor {key} is not symmetric (a second moment must be); the file was "
                              "altered or damaged: collect again")


def save_factors(factors: FactorSet, out_dir: str | Path) -> Path:
    """Write a factor directory.

    The description (the content of `factors.json`) is also stored in the safetensors
    header, so `factors.safetensors` alone is complete and is replaced by one atomic
    rename; `factors.json` is its readable copy, written after it. A kill between the two
    leaves a JSON copy that disagrees with the tensors, which `load_factors` refuses.

    Args:
        factors: what to write.
        out_dir: the directory (created if missing).

    Returns:
        The directory path.
    """
    out = Path(out_dir)
    tensors: dict[str, torch.Tensor] = {}
    targets_meta: dict[str, Any] = {}
    for name, tf in factors.targets.items():
        tensors[f"{name}.A"] = tf.A
        tensors[f"{name}.G"] = tf.G
        targets_meta[name] = {"d_in": tf.d_in, "d_out": tf.d_out, "positions": int(tf.positions),
                              "weight_sha256": tf.weight_sha256, "transposed": tf.transposed,
                              "sha256": {"A": tensor_sha256(tf.A), "G": tensor_sha256(tf.G)}}
        if tf.S is not None:
            tensors[f"{name}.S"] = tf.S
            targets_meta[name]["sha256"]["S"] = tensor_sha256(tf.S)
            targets_meta[name]["eigencorrected"] = {"positions": int(tf.S_positions),
                                                    "basis_sha256": tf.S_basis_sha256}
    meta = {"format_version": FORMAT_VERSION, "curvedit_version": __version__, "model": factors.model,
            "collection": factors.collection, "targets": targets_meta}
    write_safetensors(out / FACTORS_FILE, tensors, metadata={"format": "curvedit-factors",
                                                             "version": str(FORMAT_VERSION),
                                                             HEADER_KEY: json.dumps(meta, sort_keys=True)})
    write_json(out / META_FILE, meta)
    return out


def _read_header(tensor_path: Path) -> dict[str, Any] | None:
    """The description stored in the safetensors header (None for files without one).

    Raises:
        FactorError: the file is not a readable safetensors file.
    """
    header = safetensors_metadata(tensor_path, FactorError).get(HEADER_KEY)
    return None if header is None else json.loads(header)


def _read_json(meta_path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FactorError(f"{meta_path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise FactorError(f"{meta_path}: expected a JSON object")
    return meta


def load_factors(factor_dir: str | Path, device: str | torch.device = "cpu") -> FactorSet:
    """Read a factor directory written by `save_factors`.

    Raises:
        FactorError: missing or unreadable files, an unknown format version, a
            `factors.json` that disagrees with the tensors' own description (an interrupted
            write or a hand edit), tensors that disagree with the description or with their
            stored checksums, or a factor that is not symmetric within round-off.
    """
    root = Path(factor_dir)
    meta_path, tensor_path = root / META_FILE, root / FACTORS_FILE
    if not tensor_path.is_file():
        raise FactorError(f"{root}: not a factor directory (needs {FACTORS_FILE} and {META_FILE})")
    meta = _read_header(tensor_path)
    if meta is None:  # written before the header held the description
        if not meta_path.is_file():
            raise FactorError(f"{root}: not a factor directory (needs {FACTORS_FILE} and {META_FILE})")
        meta = _read_json(meta_path)
    elif meta_path.is_file() and _read_json(meta_path) != meta:
        raise FactorError(f"{meta_path} disagrees with the description stored in {FACTORS_FILE} (a write was "
                          f"interrupted, or the JSON was edited): collect again, or delete {META_FILE} to use the "
                          "tensors' own description")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise FactorError(f"{root}: factor format version {meta.get('format_version')} is not one of "
                          f"{READABLE_VERSIONS}")
    tensors = load_file(str(tensor_path), device=str(device))
    targets: dict[str, TargetFactors] = {}
    for name, info in (meta.get("targets") or {}).items():
        try:
            a_ii, g_oo = tensors[f"{name}.A"], tensors[f"{name}.G"]
            d_in, d_out, positions = int(info["d_in"]), int(info["d_out"]), int(info["positions"])
        except KeyError as err:
            raise FactorError(f"{root}: {name}: {err} is missing") from None
        except (TypeError, ValueError):
            raise FactorError(f"{root}: {name}: malformed description {info!r}") from None
        if a_ii.shape != (d_in, d_in) or g_oo.shape != (d_out, d_out):
            raise FactorError(f"{root}: {name} tensors have shapes {tuple(a_ii.shape)}, {tuple(g_oo.shape)}, "
                              f"but the description says d_in={d_in}, d_out={d_out}")
        sums = info.get("sha256") or {}  # files written before checksums have none
        _check_tensor(root, f"{name}.A", a_ii, sums.get("A"), square=True)
        _check_tensor(root, f"{name}.G", g_oo, sums.get("G"), square=True)
        corrected = info.get("eigencorrected")
        s_oi = tensors.get(f"{name}.S") if corrected else None
        if s_oi is not None:
            _check_tensor(root, f"{name}.S", s_oi, sums.get("S"), square=False)
        if corrected and (s_oi is None or s_oi.shape != (d_out, d_in)):
            raise FactorError(f"{root}: {name}: the description promises eigenvalue-corrected masses "
                              f"({d_out} x {d_in}), the file holds {None if s_oi is None else tuple(s_oi.shape)}")
        targets[name] = TargetFactors(A=a_ii, G=g_oo, positions=positions,
                                      weight_sha256=info.get("weight_sha256", ""),
                                      transposed=info.get("transposed", False), S=s_oi,
                                      S_positions=int(corrected["positions"]) if corrected else 0,
                                      S_basis_sha256=corrected["basis_sha256"] if corrected else "")
    if not targets:
        raise FactorError(f"{root}: the factor files describe no target")
    return FactorSet(targets=targets, model=meta.get("model", {}), collection=meta.get("collection", {}))


def without_eigencorrections(factor_dir: str | Path, names: list[str]) -> list[str]:
    """The names among `names` whose factors hold no eigenvalue-corrected masses (read from
    the description alone, before any tensor is loaded or eigenbasis computed).

    Raises:
        FactorError: not a readable factor directory.
    """
    root = Path(factor_dir)
    if not (root / FACTORS_FILE).is_file():
        raise FactorError(f"{root}: not a factor directory (needs {FACTORS_FILE} and {META_FILE})")
    meta = _read_header(root / FACTORS_FILE) or _read_json(root / META_FILE)
    described = meta.get("targets") or {}
    return [n for n in names if not (described.get(n) or {}).get("eigencorrected")]


def check_factors_match(factors: FactorSet, targets: list[Target], *, check_weights: bool = True) -> None:
    """Refuse factors that do not belong to these targets of the model at hand.

    Args:
        factors: loaded factors.
        targets: the model's targets that will be used with them.
        check_weights: also compare the weight hashes (catches an edited or different
            checkpoint of the same architecture).

    Raises:
        FactorError: a target without factors, a shape that differs, or a weight hash that
            differs; the message names the target and what differs.
    """
    problems: list[str] = []
    for target in targets:
        tf = factors.targets.get(target.name)
        if tf is None:
            problems.append(f"{target.name}: no factors (factor targets: {', '.join(list(factors.targets)[:6])} ...)")
            continue
        d_out, d_in = target.shape_oi
        if (tf.d_out, tf.d_in) != (d_out, d_in):
            problems.append(f"{target.name}: model weight is (d_out={d_out}, d_in={d_in}), "
                            f"factors are for (d_out={tf.d_out}, d_in={tf.d_in})")
        elif check_weights and not tf.weight_sha256:
            problems.append(f"{target.name}: the factors carry no weight hash, so nothing shows they belong to "
                            "this model")
        elif check_weights and tf.weight_sha256 != weight_sha256(target):
            problems.append(f"{target.name}: weights differ from those the factors were collected on "
                            f"(model {factors.model.get('name', '?')!r})")
    if problems:
        raise FactorError("factors do not match this model:\n  " + "\n  ".join(problems))


def merge_factors(parts: list[FactorSet]) -> FactorSet:
    """Combine factors collected on disjoint data into their position-weighted mean.

    Args:
        parts: two or more factor sets for the same model, targets and label mode.

    Returns:
        One factor set; `positions` are summed, and `collection["merged_from"]` lists the
        parts' data descriptions.

    Raises:
        FactorError: fewer than one part, or parts for different models, targets, shapes
            or label modes.
    """
    if not parts:
        raise FactorError("nothing to merge")
    first = parts[0]
    for index, part in enumerate(parts[1:], start=1):
        if part.model.get("weights_hash") != first.model.get("weights_hash"):
            raise FactorError(f"part {index} was collected on different model weights than part 0")
        if list(part.targets) != list(first.targets):
            raise FactorError(f"part {index} has targets {list(part.targets)[:4]}..., "
                              f"part 0 has {list(first.targets)[:4]}...")
        if part.collection.get("label_mode") != first.collection.get("label_mode"):
            raise FactorError(f"part {index} used label mode {part.collection.get('label_mode')!r}, "
                              f"part 0 {first.collection.get('label_mode')!r}")
    for i, j in itertools.combinations(range(len(parts)), 2):
        a, b = parts[i], parts[j]
        if a.collection == b.collection and all(
                a.targets[n].positions == b.targets[n].positions and torch.equal(a.targets[n].A, b.targets[n].A)
                for n in a.targets):
            raise FactorError(f"parts {i} and {j} are the same factors (same data, positions and values): merging "
                              "them would count that data twice")
    merged: dict[str, TargetFactors] = {}
    for name, tf0 in first.targets.items():
        counts = [p.targets[name].positions for p in parts]
        total = sum(counts)
        if total == 0:
            raise FactorError(f"{name}: no positions in any part")
        a_ii = sum(p.targets[name].A.double() * n for p, n in zip(parts, counts)) / total
        g_oo = sum(p.targets[name].G.double() * n for p, n in zip(parts, counts)) / total
        merged[name] = TargetFactors(A=a_ii.to(tf0.A.dtype), G=g_oo.to(tf0.G.dtype), positions=total,
                                     weight_sha256=tf0.weight_sha256, transposed=tf0.transposed)
    collection = dict(first.collection)
    collection["merged_from"] = [p.collection.get("data", "") for p in parts]
    return FactorSet(targets=merged, model=dict(first.model), collection=collection)
