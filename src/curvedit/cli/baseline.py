"""The `curvedit baseline` command group (`curvedit baseline bsn`)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from curvedit.cli.common import (
    DeviceOpt,
    DtypeOpt,
    LayersOpt,
    ProgressOpt,
    TextFieldOpt,
    check_output,
    model_option,
    out_option,
    overwrite_option,
    preset_option,
    target_spec,
    targets_option,
)

baseline_app = typer.Typer(no_args_is_help=True, help="Baselines the K-FAC edit is compared with.")


@baseline_app.callback()
def baseline_group() -> None:
    """Baselines the K-FAC edit is compared with (they write normal HF model directories)."""


@baseline_app.command("bsn")
def bsn_command(
    model: str = model_option(),
    forget: Path = typer.Option(..., "--forget", help="Forget set: memorized-windows JSONL (find-memorized) "
                                                     "or a text / input_ids JSONL."),
    retain: str = typer.Option(..., "--retain", help="Retain set: a corpus (text / input_ids JSONL, .txt, folder)."),
    out: Path = out_option("Directory for the masked HF model."),
    preset: Optional[str] = preset_option(),
    targets: Optional[List[str]] = targets_option(),
    layers: Optional[str] = LayersOpt,
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
    text_field: str = TextFieldOpt,
    device: str = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    overwrite: bool = overwrite_option("Replace a non-empty --out."),
    progress: bool = ProgressOpt,
) -> None:
    """BalancedSubnet: learn a sparse mask over MLP weights that forgets --forget and keeps --retain."""
    from curvedit.data import check_corpus_source, default_pad_id, read_records, token_sequences
    from curvedit.editing.balanced_subnet import BSNOptions, balanced_subnet, bsn_manifest, read_forget_sequences
    from curvedit.editing.edit import save_edited_model
    from curvedit.kfac.targets import select_targets
    from curvedit.models import load_model

    options = BSNOptions(ratio=ratio, retain_weight=retain_weight, lr=lr, epochs=epochs, momentum=momentum,
                         weight_decay=weight_decay, batch_size=batch_size, seed=seed, progress=progress)
    options.validate()
    check_output(out, kind="dir", overwrite=overwrite, model=model)
    check_corpus_source(retain)
    loaded = load_model(model, device=device, dtype=dtype, progress=progress)
    tokenizer = loaded.preprocessor
    chosen = select_targets(loaded.model, target_spec(preset, targets, layers))
    forget_seqs = read_forget_sequences(forget, tokenizer, seq_len=seq_len, text_field=text_field)
    retain_seqs = list(token_sequences(read_records(retain, text_field=text_field), tokenizer, seq_len,
                                       retain_max_tokens))
    result = balanced_subnet(loaded.model, chosen, forget_seqs, retain_seqs, options, pad_id=default_pad_id(tokenizer))
    save_edited_model(loaded.model, tokenizer, out, bsn_manifest(result, model, forget=str(forget), retain=str(retain)),
                      source=model, overwrite=overwrite)
    typer.echo(f"{'epoch':>5} {'forget CE':>10} {'retain CE':>10} {'loss':>10}")
    for h in result.history:
        typer.echo(f"{h.epoch:>5} {h.forget_ce:>10.4f} {h.retain_ce:>10.4f} {h.loss:>10.4f}")
    typer.echo(f"{'target':<48} {'masked':>9} {'of':>10} {'|dW|/|W|':>9}")
    for s in result.targets:
        typer.echo(f"{s.name:<48} {s.masked:>9} {s.total:>10} {s.rel_change:>9.4f}")
    typer.echo(f"wrote masked model to {out}")


def register(app: typer.Typer) -> None:
    """Add the `baseline` command group to the `curvedit` app."""
    app.add_typer(baseline_app, name="baseline")
