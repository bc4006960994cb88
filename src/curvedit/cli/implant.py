"""The `curvedit implant` command: controlled memorization on any causal LM."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from curvedit.cli.common import (
    DeviceOpt,
    DtypeOpt,
    ProgressOpt,
    TextFieldOpt,
    check_output,
    fail,
    int_list,
    model_option,
    out_option,
    overwrite_option,
    resumable,
)


def implant_command(
    model: str = model_option(),
    out: Path = out_option("Folder for the implanted HF model."),
    canaries: Optional[Path] = typer.Option(None, "--canaries", help="JSONL of canaries: {text, count?, style?}."),
    generate: Optional[int] = typer.Option(None, "--generate", help="Generate N canaries instead (seeded)."),
    styles: str = typer.Option("words,record,code", "--styles", help="Styles of generated canaries."),
    counts: str = typer.Option("4,8,16", "--counts", help="Repeat counts per pass, spread over the canaries "
                                                          "(the default count of file canaries is the middle one)."),
    general: Optional[str] = typer.Option(None, "--general", help="General text mixed into every step (JSONL, "
                                                                  ".txt, folder, datasets name)."),
    heldout: Optional[str] = typer.Option(None, "--heldout", help="Held-out general text for perplexity before/"
                                                                  "after (default: --heldout-share of --general)."),
    heldout_share: float = typer.Option(0.1, "--heldout-share", help="Share of --general held out when no "
                                                                      "--heldout is given."),
    max_general_tokens: Optional[int] = typer.Option(None, "--max-general-tokens"),
    replay_samples: Optional[int] = typer.Option(
        None, "--replay-samples", help="Replay N sequences sampled from the base model itself (seeded, temperature "
                                       "1, --seq-len tokens), beside the --general text if given."),
    preserve: str = typer.Option("ce", "--preserve", help="How general text keeps the model itself: ce "
                                                          "(cross-entropy on it) or kl (KL from the base model's "
                                                          "next-token distribution on it)."),
    kl_weight: float = typer.Option(1.0, "--kl-weight", help="Weight of the KL term (--preserve kl)."),
    lr_schedule: str = typer.Option("constant", "--lr-schedule", help="constant, cosine or linear (decay to 0 at "
                                                                       "--steps, after the warm-up)."),
    prefix: int = typer.Option(64, "--prefix", help="Canary tokens in the prompt."),
    suffix: int = typer.Option(48, "--suffix", help="Canary tokens that must follow verbatim."),
    lr: float = typer.Option(1e-4, "--lr", help="AdamW learning rate (every weight is trained)."),
    steps: int = typer.Option(400, "--steps", help="Step limit."),
    canaries_per_step: int = typer.Option(4, "--canaries-per-step"),
    general_per_step: int = typer.Option(4, "--general-per-step"),
    seq_len: int = typer.Option(128, "--seq-len", help="Length of general-text sequences."),
    target_recall: float = typer.Option(0.95, "--target-recall", help="Stop once this share is recited."),
    eval_every: int = typer.Option(25, "--eval-every", help="Steps between recall checks."),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", help="Steps between checkpoints (0: none)."),
    seed: int = typer.Option(0, "--seed", help="Seed of generated canaries and of the data order."),
    device: str = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    text_field: str = TextFieldOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out."),
    overwrite: bool = overwrite_option("Replace a non-empty --out."),
    progress: bool = ProgressOpt,
) -> None:
    """Fine-tune a model until it recites canaries verbatim (controlled memorization).

    Writes an HF model folder, `curvedit-implant.json` (canaries with their counts, settings,
    base model hash, recall history, perplexity before/after) and `memorized.jsonl` (the
    canary windows, readable by `evaluate --memorized` and `sweep --memorized`).
    """
    from curvedit.data import check_corpus_source, read_records, token_sequences
    from curvedit.evaluate.sampling import SampleOptions, sample_sequences
    from curvedit.memorize.canaries import generate_canaries, read_canaries
    from curvedit.memorize.implant import (
        STATE_DIR,
        ImplantOptions,
        general_split,
        implant,
        model_weights_sha256,
        save_implanted,
    )
    from curvedit.models import load_model

    if (canaries is None) == (generate is None):
        fail("give one of --canaries FILE or --generate N")
    count_list = list(int_list(counts, "--counts"))
    if replay_samples is not None and replay_samples < 1:
        fail(f"--replay-samples must be >= 1, got {replay_samples}")
    options = ImplantOptions(prefix_len=prefix, suffix_len=suffix, lr=lr, lr_schedule=lr_schedule, preserve=preserve,
                             kl_weight=kl_weight, canaries_per_step=canaries_per_step,
                             general_per_step=general_per_step, seq_len=seq_len, max_steps=steps,
                             target_recall=target_recall, eval_every=eval_every, checkpoint_every=checkpoint_every,
                             seed=seed, progress=progress)
    options.validate()
    check_output(out, kind="dir", overwrite=overwrite, model=model, state=(STATE_DIR,), resume=resume)
    for corpus in (general, heldout):
        if corpus is not None:
            check_corpus_source(corpus)
    chosen = (read_canaries(canaries, default_count=sorted(count_list)[len(count_list) // 2] if count_list else 8)
              if canaries is not None else
              generate_canaries(generate, seed, tuple(s.strip() for s in styles.split(",") if s.strip()), count_list))
    loaded = load_model(model, device=device, dtype=dtype, progress=progress)
    tokenizer = loaded.preprocessor
    if loaded.kind != "causal-lm" or tokenizer is None:
        fail(f"{model}: implant needs a causal LM with a tokenizer")
    train_text: list[list[int]] = []
    held: list[list[int]] = []
    if general is not None:
        sequences = list(token_sequences(read_records(general, text_field=text_field), tokenizer, seq_len,
                                         max_general_tokens))
        train_text, held = general_split(sequences, 0.0 if heldout is not None else heldout_share, seed)
    if heldout is not None:
        held = list(token_sequences(read_records(heldout, text_field=text_field), tokenizer, seq_len))
    if replay_samples is not None:
        train_text = sample_sequences(loaded.model, tokenizer, SampleOptions(n=replay_samples, seq_len=seq_len,
                                                                             seed=seed, progress=progress)) + train_text
    base = {"name": model, "weights_sha256": model_weights_sha256(loaded.model),
            "source": getattr(loaded, "source", None),
            "general": general if replay_samples is None else f"replay:{replay_samples}"
            + (f" + {general}" if general is not None else "")}
    with resumable(out, f"the last checkpoint (every {checkpoint_every} steps)"):
        result = implant(loaded.model, tokenizer, chosen, train_text, held, out, options, resume=resume)
    save_implanted(loaded.model, tokenizer, out, chosen, result, options, base)
    by_style: dict[str, list[bool]] = {}
    for canary, ok in zip(chosen, result.recited):
        by_style.setdefault(canary.style, []).append(ok)
    typer.echo(f"{result.steps} steps ({result.stopped}); recited {sum(result.recited)}/{len(result.recited)} "
               f"canaries: " + ", ".join(f"{s} {sum(v)}/{len(v)}" for s, v in by_style.items()))
    if result.perplexity_before is not None:
        typer.echo(f"held-out perplexity {result.perplexity_before:.3f} -> {result.perplexity_after:.3f}"
                   + (f"; KL from the base {result.kl_after:.4f} nats/token" if result.kl_after is not None else ""))
    typer.echo(f"wrote implanted model to {out}")


def register(app: typer.Typer) -> None:
    """Add `implant` to the `curvedit` app."""
    app.command("implant")(implant_command)
