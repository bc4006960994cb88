"""`curvedit sample` (text from the model itself) and `curvedit capabilities` (the suite's task files)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from curvedit.cli.common import (
    DeviceOpt,
    DtypeOpt,
    ProgressOpt,
    check_output,
    fail,
    model_option,
    out_option,
    overwrite_option,
)


def sample_command(
    model: str = model_option(),
    out: Path = out_option("JSONL file of the samples ({input_ids, text} per line; `collect --data` reads it)."),
    n: int = typer.Option(256, "--n", help="Sequences to draw."),
    seq_len: int = typer.Option(128, "--seq-len", help="The most tokens per sequence (start token included)."),
    temperature: float = typer.Option(1.0, "--temperature", help="1 samples the model's own distribution."),
    seed: int = typer.Option(0, "--seed", help="Sequence i draws from a generator seeded by (seed, i)."),
    batch_size: int = typer.Option(16, "--batch-size"),
    start_id: Optional[int] = typer.Option(None, "--start-id", help="First token of every sequence "
                                                                     "(default: BOS, else EOS)."),
    device: str = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    overwrite: bool = overwrite_option("Replace an existing --out file."),
    progress: bool = ProgressOpt,
) -> None:
    """Draw sequences from the model itself (factor data and replay text that match its distribution)."""
    from curvedit.data import write_jsonl
    from curvedit.evaluate.sampling import SampleOptions, sample_sequences
    from curvedit.models import load_model

    options = SampleOptions(n=n, seq_len=seq_len, temperature=temperature, seed=seed, batch_size=batch_size,
                            start_id=start_id, progress=progress)
    options.validate()
    check_output(out, kind="file", overwrite=overwrite, model=model)
    loaded = load_model(model, device=device, dtype=dtype, progress=progress)
    if loaded.kind != "causal-lm":
        fail(f"{model}: sampling needs a causal LM")
    sequences = sample_sequences(loaded.model, loaded.preprocessor, options)
    decode = loaded.preprocessor.decode if loaded.preprocessor is not None else (lambda ids: "")
    write_jsonl(({"input_ids": seq, "text": decode(seq)} for seq in sequences), out, overwrite=True)
    tokens = sum(len(s) for s in sequences)
    typer.echo(f"wrote {len(sequences)} sequences ({tokens} tokens) to {out}")


def capabilities_command(
    out: Path = out_option("Folder of task files (NAME.jsonl; `evaluate --tasks` reads it)."),
    families: Optional[str] = typer.Option(None, "--families", help="Comma-separated families (default: all)."),
    n: int = typer.Option(100, "--n", help="Items per family (fact families have at most their list's length)."),
    seed: int = typer.Option(0, "--seed"),
    fmt: str = typer.Option("generate", "--format", help="generate (greedy exact match) or choice "
                                                         "(log-likelihood over options)."),
    overwrite: bool = overwrite_option("Replace existing task files."),
) -> None:
    """Write the capability suite (logic, open-book, facts common/rare, arithmetic, copying, cloze) as task files."""
    from curvedit.evaluate.capabilities import FAMILIES, capability_tasks, write_tasks

    names = [f.strip() for f in families.split(",") if f.strip()] if families is not None else None
    tasks = capability_tasks(names, n=n, seed=seed, fmt=fmt)
    check_output(out, kind="dir", overwrite=overwrite, names=[f"{t.name}.jsonl" for t in tasks])
    write_tasks(tasks, out, overwrite=overwrite)
    for task in tasks:
        typer.echo(f"{task.name:14s} {FAMILIES[task.name].band:20s} {len(task.items)} items")
    typer.echo(f"wrote {len(tasks)} task files to {out}")


def register(app: typer.Typer) -> None:
    """Add `sample` and `capabilities` to the `curvedit` app."""
    app.command("sample")(sample_command)
    app.command("capabilities")(capabilities_command)
