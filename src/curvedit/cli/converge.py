"""`curvedit converge`: how much data do the factors need?"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from curvedit.cli.common import (
    DeviceOpt,
    LayersOpt,
    ProgressOpt,
    TextFieldOpt,
    check_output,
    fail,
    int_list,
    overwrite_option,
    preset_option,
    read_windows,
    target_spec,
    targets_option,
)


def converge_command(
    out: Path = typer.Option(..., "--out", "-o", help="Folder: factors per budget, converge.json, converge.png "
                                                      "(or, with --factors-a/-b, the comparison JSON file)."),
    factors_a: Optional[Path] = typer.Option(None, "--factors-a", help="Compare two factor folders: the one judged "
                                                                       "..."),
    factors_b: Optional[Path] = typer.Option(None, "--factors-b", help="... against this reference."),
    model: Optional[str] = typer.Option(None, "--model", help="Or collect: the model."),
    data: Optional[str] = typer.Option(None, "--data", help="The corpus whose nested prefixes are collected."),
    tokens: str = typer.Option("10000,30000,100000", "--tokens", help="Token budgets, ascending (the last is the "
                                                                      "reference)."),
    keep_fraction: Optional[float] = typer.Option(None, "--keep-fraction", help="Selection compared [default 0.5]."),
    rho: Optional[float] = typer.Option(None, "--rho", help="Or a mass share."),
    gold: bool = typer.Option(True, "--gold/--no-gold", help="Also gold labels at the last budget vs sampled."),
    memorized: Optional[Path] = typer.Option(None, "--memorized", help="Memorized windows: recall of the edit made "
                                                                       "with each budget's factors."),
    heldout: Optional[Path] = typer.Option(None, "--heldout", help="Held-out text: perplexity of each edit."),
    preset: Optional[str] = preset_option(),
    targets: Optional[list[str]] = targets_option(),
    layers: Optional[str] = LayersOpt,
    seq_len: int = typer.Option(256, "--seq-len", help="Sequence length of the collection."),
    batch_size: int = typer.Option(8, "--batch-size"),
    seed: int = typer.Option(0, "--seed", help="Label-sampling seed."),
    text_field: str = TextFieldOpt,
    device: str = DeviceOpt,
    overwrite: bool = overwrite_option("Replace an existing comparison or report in --out."),
    progress: bool = ProgressOpt,
) -> None:
    """Where does the edit stop changing as the factors see more tokens? Compare the kept
    subspaces (share of the reference selection's mass the other captures), and with
    --memorized/--heldout the recall and perplexity of the edit made with each budget."""
    from curvedit.diagnostics.converge import ConvergeOptions, compare_factors, plot_convergence, run_convergence
    from curvedit.editing.edit import EditRule
    from curvedit.io import write_json

    if rho is not None and keep_fraction is not None:
        fail("give one of --rho or --keep-fraction")
    rule = EditRule("*", rho=rho, keep_fraction=None if rho is not None else (
        keep_fraction if keep_fraction is not None else 0.5))
    if (factors_a is None) != (factors_b is None):
        fail("--factors-a and --factors-b go together")
    if factors_a is not None:
        if model is not None or data is not None:
            fail("compare two factor folders (--factors-a/-b) or collect (--model/--data), not both")
        from curvedit.kfac.factors import load_factors

        check_output(out, kind="file", overwrite=overwrite, inputs=[factors_a, factors_b])
        comparison = compare_factors(load_factors(factors_a), load_factors(factors_b), rule)
        for name, share in comparison.per_target.items():
            typer.echo(f"{name:<48} {share:.4f}")
        typer.echo(f"mean share of {factors_b}'s kept mass captured by {factors_a}'s selection: {comparison.mean:.4f}")
        write_json(out, comparison.to_dict())
        return
    if model is None or data is None:
        fail("give --model and --data (collect nested prefixes), or --factors-a and --factors-b")
    if (memorized is None) != (heldout is None):
        fail("--memorized and --heldout go together (the edit's recall and perplexity)")
    budgets = int_list(tokens, "--tokens")
    options = ConvergeOptions(budgets=budgets, rule=rule, gold=gold, batch_size=batch_size, seed=seed,
                              progress=progress)
    check_output(out, kind="dir", reuse=True, model=model)
    if not overwrite and (out / "converge.json").exists():
        fail(f"{out / 'converge.json'} exists; pass --overwrite to replace it (the factors per budget are reused)")
    from curvedit.data import check_corpus_source, default_pad_id, read_records, token_sequences
    from curvedit.diagnostics.attack import recall_and_perplexity
    from curvedit.evaluate.perplexity import heldout_sequences
    from curvedit.kfac.targets import select_targets
    from curvedit.models import load_model

    check_corpus_source(data)
    loaded = load_model(model, device=device, progress=progress)
    chosen = select_targets(loaded.model, target_spec(preset, targets, layers))
    pad_id = default_pad_id(loaded.preprocessor)
    sequences = list(token_sequences(read_records(data, text_field=text_field), loaded.preprocessor, seq_len,
                                     budgets[-1] if budgets else None))
    evaluate = None
    if memorized is not None:
        windows = read_windows(memorized, loaded)
        text = heldout_sequences(heldout, loaded.preprocessor, seq_len=seq_len, max_tokens=50_000,
                                 text_field=text_field)

        def evaluate(m):
            return recall_and_perplexity(m, windows, text, pad_id=pad_id)
    result = run_convergence(loaded.model, sequences, chosen, out, options, evaluate, pad_id)
    for row in result["rows"]:
        extra = f", loose {row['loose']:.3f}, perplexity {row['perplexity']:.4f}" if "loose" in row else ""
        typer.echo(f"{row['tokens']:>10} tokens: captures {row['captured']:.4f} of the reference's kept mass{extra}")
    if result["gold"]:
        typer.echo(f"gold labels at {result['gold']['tokens']} tokens: capture "
                   f"{result['gold']['captured_gold_in_sampled']:.4f} of the sampled selection's mass")
    write_json(out / "converge.json", result)
    plot_convergence(result, out / "converge.png")
    typer.echo(f"wrote {out / 'converge.json'} and {out / 'converge.png'}")


def register(app: typer.Typer) -> None:
    """Add `converge` to the `curvedit` app."""
    app.command("converge")(converge_command)
