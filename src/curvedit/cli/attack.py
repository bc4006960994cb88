"""The `curvedit attack` command group: does an edit last? (`relearn`, `quantize`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from curvedit.cli.common import (
    DeviceOpt,
    ProgressOpt,
    TextFieldOpt,
    check_output,
    fail,
    int_list,
    model_option,
    out_option,
    overwrite_option,
    read_windows,
)

attack_app = typer.Typer(no_args_is_help=True, help="Durability attacks on an edited model: relearning, quantization.")


@attack_app.callback()
def attack_group() -> None:
    """Durability attacks on an edited model: relearning, quantization."""


MemorizedOpt = typer.Option(..., "--memorized", help="Memorized windows whose recall is measured (e.g. the held-out "
                                                     "half).")
HeldoutOpt = typer.Option(None, "--heldout", help="Held-out text for perplexity along the way.")


def _load(model: str, memorized: Path, heldout: Optional[Path], device: str, text_field: str, progress: bool):
    from curvedit.data import default_pad_id
    from curvedit.evaluate.perplexity import heldout_sequences
    from curvedit.models import context_window, load_model

    loaded = load_model(model, device=device, progress=progress)
    windows = read_windows(memorized, loaded)
    sequences = None
    if heldout is not None:
        limit = context_window(loaded.model) or 512
        sequences = heldout_sequences(heldout, loaded.preprocessor, seq_len=min(512, limit), max_tokens=50_000,
                                      text_field=text_field)
    return loaded, windows, sequences, default_pad_id(loaded.preprocessor)


def _write(out: Path, document: dict) -> None:
    from curvedit.io import write_json

    write_json(out, document)
    typer.echo(f"wrote {out}")


@attack_app.command("relearn")
def relearn_command(
    model: str = model_option("The (edited) model to attack."),
    memorized: Path = MemorizedOpt,
    out: Path = out_option("Results JSON."),
    data: Optional[Path] = typer.Option(None, "--data", help="Attacker's text corpus (JSONL/txt) to fine-tune on."),
    windows: Optional[Path] = typer.Option(None, "--windows", help="Or memorized windows to fine-tune on (prefix + "
                                                                   "suffix; e.g. the tune half)."),
    heldout: Optional[Path] = HeldoutOpt,
    steps: str = typer.Option("0,10,30,100", "--steps", help="Measure after these optimizer steps."),
    lr: float = typer.Option(1e-4, "--lr", help="AdamW learning rate."),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per step."),
    seq_len: int = typer.Option(128, "--seq-len", help="Sequence length of --data text."),
    seed: int = typer.Option(0, "--seed", help="Data order seed."),
    text_field: str = TextFieldOpt,
    device: str = DeviceOpt,
    overwrite: bool = overwrite_option("Replace an existing results file."),
    progress: bool = ProgressOpt,
) -> None:
    """Fine-tune every weight on --data or --windows and re-measure recall of --memorized
    (and --heldout perplexity) after each step count; the model on disk is not changed."""
    from curvedit.data import check_corpus_source, read_records, token_sequences
    from curvedit.diagnostics.attack import RelearnOptions, recall_and_perplexity, relearn_curve

    if (data is None) == (windows is None):
        fail("give one of --data (text) or --windows (memorized windows) to fine-tune on")
    inputs = [p for p in (memorized, data, windows, heldout) if p is not None]
    check_output(out, kind="file", overwrite=overwrite, inputs=inputs)
    options = RelearnOptions(steps=int_list(steps, "--steps"), lr=lr, batch_size=batch_size, seed=seed,
                             progress=progress)
    options.validate()
    for corpus in (data, heldout):
        if corpus is not None:
            check_corpus_source(corpus)
    loaded, targets, sequences, pad_id = _load(model, memorized, heldout, device, text_field, progress)
    if data is not None:
        train = list(token_sequences(read_records(data, text_field=text_field), loaded.preprocessor, seq_len))
    else:
        train = [w.prefix_ids + w.suffix_ids for w in read_windows(windows, loaded)]
    rows = relearn_curve(loaded.model, train, lambda m: recall_and_perplexity(m, targets, sequences, pad_id=pad_id),
                         options, pad_id=pad_id)
    for row in rows:
        ppl = f", perplexity {row['perplexity']:.4f}" if "perplexity" in row else ""
        typer.echo(f"step {row['step']:>5}: strict {row['strict']:.3f}, loose {row['loose']:.3f}{ppl}")
    _write(out, {"attack": "relearn", "model": model, "memorized": str(memorized),
                 "data": str(data or windows), "options": {"steps": list(options.steps), "lr": lr,
                                                           "batch_size": batch_size, "seed": seed,
                                                           "seq_len": seq_len}, "rows": rows})


@attack_app.command("quantize")
def quantize_command(
    model: str = model_option("The (edited) model to attack."),
    memorized: Path = MemorizedOpt,
    out: Path = out_option("Results JSON."),
    heldout: Optional[Path] = HeldoutOpt,
    bits: str = typer.Option("8,4", "--bits", help="Bit widths, comma-separated."),
    group_size: int = typer.Option(128, "--group-size", help="Inputs per quantization group (0: the whole row)."),
    text_field: str = TextFieldOpt,
    device: str = DeviceOpt,
    overwrite: bool = overwrite_option("Replace an existing results file."),
    progress: bool = ProgressOpt,
) -> None:
    """Round-to-nearest quantization (per output channel, in groups) of every block weight,
    and recall of --memorized (and --heldout perplexity) before and after."""
    from curvedit.data import check_corpus_source
    from curvedit.diagnostics.attack import quantization_rows, recall_and_perplexity

    widths = int_list(bits, "--bits")
    if not widths or any(not 2 <= b <= 16 for b in widths):
        fail(f"--bits must be widths in [2, 16], got {bits!r}")
    if group_size < 0:
        fail(f"--group-size must be >= 0 (0: the whole row), got {group_size}")
    check_output(out, kind="file", overwrite=overwrite, inputs=[p for p in (memorized, heldout) if p is not None])
    if heldout is not None:
        check_corpus_source(heldout)
    loaded, targets, sequences, pad_id = _load(model, memorized, heldout, device, text_field, progress)
    rows = quantization_rows(loaded.model, lambda m: recall_and_perplexity(m, targets, sequences, pad_id=pad_id),
                             widths, group_size or None)
    for row in rows:
        ppl = f", perplexity {row['perplexity']:.4f}" if "perplexity" in row else ""
        typer.echo(f"{'as is' if row['bits'] is None else str(row['bits']) + '-bit':>7}: strict {row['strict']:.3f}, "
                   f"loose {row['loose']:.3f}{ppl}")
    _write(out, {"attack": "quantize", "model": model, "memorized": str(memorized), "bits": list(widths),
                 "group_size": group_size or None, "rows": rows})


def register(app: typer.Typer) -> None:
    """Add the `attack` command group to the `curvedit` app."""
    app.add_typer(attack_app, name="attack")
