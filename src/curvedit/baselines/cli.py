"""The `curvedit baseline` command group (`curvedit baseline bsn`)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

baseline_app = typer.Typer(no_args_is_help=True, help="Baselines the K-FAC edit is compared with.")


@baseline_app.callback()
def baseline_group() -> None:
    """Baselines the K-FAC edit is compared with (they write normal HF model directories)."""


@baseline_app.command("bsn")
def bsn_command(
    model: str = typer.Option(..., "--model", "-m", help="HF model name or local directory."),
    forget: Path = typer.Option(..., "--forget", help="Forget set: memorized-windows JSONL (find-memorized) "
                                                     "or a text / input_ids JSONL."),
    retain: str = typer.Option(..., "--retain", help="Retain set: a corpus (text / input_ids JSONL, .txt, folder)."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for the masked HF model."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Target preset [default: mlp]."),
    targets: Optional[List[str]] = typer.Option(None, "--targets", "-t", help="Module-name glob or 're:REGEX'."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Layer range, e.g. 23-25 or 0,3,5-7."),
    ratio: float = typer.Option(0.0015, "--ratio", help="Fraction of each matrix to zero."),
    retain_weight: float = typer.Option(0.7, "--retain-weight", help="w in -(1-w) CE(forget) + w CE(retain)."),
    lr: float = typer.Option(0.3, "--lr", help="SGD learning rate on the scores."),
    epochs: int = typer.Option(5, "--epochs", help="Passes over the larger of the two sets."),
    momentum: float = typer.Option(0.9, "--momentum"),
    weight_decay: float = typer.Option(5e-4, "--weight-decay"),
    batch_size: int = typer.Option(64, "--batch-size", help="Sequences per forget batch and per retain batch."),
    seq_len: int = typer.Option(512, "--seq-len", help="Sequence length for packing text corpora."),
    retain_max_tokens: Optional[int] = typer.Option(None, "--retain-max-tokens",
                                                    help="Token budget of the retain set."),
    seed: int = typer.Option(0, "--seed", help="Seed of the scores and the batch order."),
    text_field: str = typer.Option("text", "--text-field"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Load weights as bf16/fp16/float32."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """BalancedSubnet: learn a sparse mask over MLP weights that forgets --forget and keeps --retain."""
    from curvedit.baselines.balanced_subnet import (  # noqa: PLC0415
        BSNError, BSNOptions, balanced_subnet, bsn_manifest, read_forget_sequences)
    from curvedit.cli import fail, target_spec  # noqa: PLC0415
    from curvedit.data import DataError, read_records, token_sequences  # noqa: PLC0415
    from curvedit.edit import EditError, save_edited_model  # noqa: PLC0415
    from curvedit.evaluate.memorization import default_pad_id  # noqa: PLC0415
    from curvedit.models import load_model  # noqa: PLC0415
    from curvedit.targets import TargetError, select_targets  # noqa: PLC0415

    if out.exists() and Path(model).exists() and out.resolve() == Path(model).resolve():
        fail(f"refusing to write the masked model into the input model's directory {model}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        fail(f"{out} exists and is not empty; pass --overwrite to replace it")
    options = BSNOptions(ratio=ratio, retain_weight=retain_weight, lr=lr, epochs=epochs, momentum=momentum,
                         weight_decay=weight_decay, batch_size=batch_size, seed=seed, progress=progress)
    try:
        options.validate()
        loaded = load_model(model, device=device, dtype=dtype)
        tokenizer = loaded.preprocessor
        chosen = select_targets(loaded.model, target_spec(preset, targets, layers))
        forget_seqs = read_forget_sequences(forget, tokenizer, seq_len=seq_len, text_field=text_field)
        retain_seqs = list(token_sequences(read_records(retain, text_field=text_field), tokenizer, seq_len,
                                           retain_max_tokens))
        result = balanced_subnet(loaded.model, chosen, forget_seqs, retain_seqs, options,
                                 pad_id=default_pad_id(tokenizer))
        save_edited_model(loaded.model, tokenizer, out,
                          bsn_manifest(result, model, forget=str(forget), retain=str(retain)),
                          source=model, overwrite=overwrite)
    except (BSNError, DataError, EditError, TargetError, FileNotFoundError, ValueError) as err:
        fail(str(err))
    typer.echo(f"{'epoch':>5} {'forget CE':>10} {'retain CE':>10} {'loss':>10}")
    for h in result.history:
        typer.echo(f"{h.epoch:>5} {h.forget_ce:>10.4f} {h.retain_ce:>10.4f} {h.loss:>10.4f}")
    typer.echo(f"{'target':<48} {'masked':>9} {'of':>10} {'|dW|/|W|':>9}")
    for s in result.targets:
        typer.echo(f"{s.name:<48} {s.masked:>9} {s.total:>10} {s.rel_change:>9.4f}")
    typer.echo(f"wrote masked model to {out}")


def register(app: typer.Typer) -> None:
    """Add the `baseline` command group to the `curvedit` app.

    Args:
        app: the typer application.
    """
    app.add_typer(baseline_app, name="baseline")
