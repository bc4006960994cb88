"""The `collect` and `merge` commands: K-FAC factors."""

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
    model_option,
    out_option,
    overwrite_option,
    preset_option,
    resumable,
    target_spec,
    targets_option,
)

# Files of an unfinished collection in its --out folder (continued with --resume).
CHECKPOINT_FILES = ("checkpoint.*",)


def collect_command(
    model: str = model_option(),
    data: str = typer.Option(..., "--data", "-d", help="JSONL (text or input_ids), .txt, a folder, a datasets name; "
                                                       "for image models a folder of CLASS/*.png."),
    out: Path = out_option("Factor directory to write."),
    preset: Optional[str] = preset_option(),
    targets: Optional[list[str]] = targets_option(),
    layers: Optional[str] = LayersOpt,
    labels: str = typer.Option("sampled", "--labels", help="sampled (true Fisher) or gold (empirical Fisher)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Sequence length for packing text / cutting "
                                                                  "input_ids [default: 512, or the model's context "
                                                                  "window if shorter]."),
    batch_size: int = typer.Option(8, "--batch-size"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Token budget (LMs) / image count (vision)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the label sampler."),
    accumulate: str = typer.Option("float32", "--accumulate-dtype", help="float32 or float64 accumulators."),
    model_dtype: Optional[str] = typer.Option(None, "--model-dtype", help="Load weights as bf16/fp16/float32."),
    device: str = DeviceOpt,
    positions: str = typer.Option("cls", "--positions", help="Vision: cls (default) or all token positions."),
    text_field: str = TextFieldOpt,
    split: str = typer.Option("train", "--split", help="Split, for datasets sources."),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", help="Batches between checkpoints."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out."),
    overwrite: bool = overwrite_option("Replace existing factors (or an unfinished run) in --out."),
    progress: bool = ProgressOpt,
    layers_per_pass: Optional[int] = typer.Option(
        None, "--layers-per-pass", help="Hook the targets of at most this many blocks per pass over the data (one "
                                        "pass per group; the data is read once per pass). Default: one pass."),
    gradient_checkpointing: bool = typer.Option(
        False, "--gradient-checkpointing", help="Recompute each block's activations in the backward pass: less "
                                                "activation memory, about one more forward pass of compute."),
    fsdp: bool = typer.Option(
        False, "--fsdp", help="Under torchrun: shard the weights over the processes (FSDP2, one unit per block); "
                              "the model is loaded on the CPU and only its shards move to the device."),
    eigencorrect: bool = typer.Option(
        False, "--eigencorrect", help="A second pass over the data: the eigenvalue-corrected (EK-FAC) mass of every "
                                      "component, stored as NAME.S (edit --masses ekfac uses it)."),
    memory_check: bool = typer.Option(
        True, "--memory-check/--no-memory-check", help="Refuse to start when the memory plan (printed first) "
                                                      "says the run will not fit in the device's free memory."),
) -> None:
    """Collect K-FAC factors (A = E[x x^T], G = E[g g^T]) for the target weights.

    Data parallel: `torchrun --nproc-per-node N $(which curvedit) collect ...` runs N
    processes (gloo on CPU; NCCL with --device cuda, rank r on cuda:LOCAL_RANK); each
    processes every N-th batch, the sums are all-reduced, and rank 0 alone writes. With
    --fsdp the weights are sharded over the processes too (FSDP2, one unit per block).
    """
    from curvedit.data import check_corpus_source, image_batches, lm_batches, read_records, token_sequences
    from curvedit.distributed import all_agree, barrier, destroy, init_from_env, shard_model
    from curvedit.kfac.collect import CHECKPOINT_TENSORS, CollectOptions, collect_factors
    from curvedit.kfac.factors import save_factors
    from curvedit.kfac.memory import plan_memory
    from curvedit.kfac.objectives import ImageClassificationObjective
    from curvedit.kfac.targets import select_targets
    from curvedit.models import context_window, load_model

    options = CollectOptions(label_mode=labels, accumulate_dtype=accumulate, seed=seed, checkpoint_dir=out,
                             checkpoint_every=checkpoint_every, resume=resume, progress=progress,
                             description=str(data), layers_per_pass=layers_per_pass,
                             gradient_checkpointing=gradient_checkpointing)
    options.validate()
    check_output(out, kind="dir", overwrite=overwrite, model=model, state=CHECKPOINT_FILES, resume=resume)
    if resume and not (out / CHECKPOINT_TENSORS).is_file():
        fail(f"--resume: no checkpoint in {out}")
    check_corpus_source(data)
    ctx, device = init_from_env(device)
    try:
        if fsdp and not ctx.distributed:
            fail("--fsdp shards the weights over several processes: launch with torchrun --nproc-per-node N (N >= 2)")
        if fsdp and eigencorrect:
            fail("--eigencorrect does not support --fsdp yet (data parallel torchrun works)")
        loaded = load_model(model, device="cpu" if fsdp else device, dtype=model_dtype,
                            progress=progress and ctx.is_main)
        chosen = select_targets(loaded.model, target_spec(preset, targets, layers))
        context = context_window(loaded.model)
        if loaded.kind == "causal-lm" and context is not None and seq_len is not None and seq_len > context:
            fail(f"--seq-len {seq_len} is longer than the model's context window of {context} tokens")
        if seq_len is not None and seq_len < 2:
            fail(f"--seq-len must be at least 2 (a position needs a next token), got {seq_len}")
        seq_len = seq_len if seq_len is not None else min(512, context or 512)
        plan = plan_memory(loaded.model, chosen, batch_size, seq_len, accumulate, layers_per_pass, device,
                           ranks_sharing_memory=ctx.local_world_size if device == "cpu" else 1,
                           gradient_checkpointing=gradient_checkpointing,
                           weight_shards=ctx.world_size if fsdp else 1)
        if ctx.is_main and (progress or not plan.fits):  # like the progress bars: --no-progress hides it
            typer.echo(plan.table(), err=True)
        if memory_check and not all_agree(plan.fits, ctx):
            reason = (f"needs about {plan.needed_bytes / 2**30:.1f} GiB, {plan.available_bytes / 2**30:.1f} GiB "
                      f"free on {device}; {plan.suggestion}" if not plan.fits else "another rank's plan does not fit")
            fail(f"the memory plan says this run will not fit: {reason} (--no-memory-check runs it anyway)")
        if fsdp:
            shard_model(loaded.model, device, ctx)
        if loaded.kind == "image-classification":
            def batches():
                return image_batches(data, loaded.preprocessor, batch_size, max_images=max_tokens)
            objective = ImageClassificationObjective(labels, positions)
            options.extra = {"positions": positions}
        else:
            tokenizer = loaded.preprocessor
            pad_id = getattr(tokenizer, "pad_token_id", None) or 0

            def batches():
                sequences = token_sequences(read_records(data, text_field=text_field, split=split),
                                            tokenizer, seq_len, max_tokens)
                return lm_batches(sequences, batch_size, pad_id)
            objective = None
            options.total_tokens = max_tokens
            options.extra = {"seq_len": seq_len, "max_tokens": max_tokens, "batch_size": batch_size}
        with resumable(out, f"the last checkpoint (every {checkpoint_every} batches)"):
            factors = collect_factors(loaded.model, batches, chosen, objective, options, model_name=model)
        if ctx.is_main:
            save_factors(factors, out)
            for stale in ("checkpoint.safetensors", "checkpoint.json"):
                (out / stale).unlink(missing_ok=True)
            typer.echo(f"wrote factors for {len(factors.targets)} targets to {out} "
                       f"({factors.collection['tokens']} tokens, "
                       f"{next(iter(factors.targets.values())).positions} positions"
                       + (f", {ctx.world_size} processes)" if ctx.distributed else ")"))
        barrier(ctx)
        if eigencorrect:
            from curvedit.kfac.eigencorrect import eigencorrect_factors

            eigencorrect_factors(loaded.model, batches, chosen, out, objective, options)
            if ctx.is_main:
                typer.echo(f"added eigenvalue-corrected masses (NAME.S) for {len(chosen)} targets to {out}")
            barrier(ctx)
    finally:
        destroy()


def merge_command(
    parts: list[Path] = typer.Argument(..., help="Factor directories collected on disjoint data."),
    out: Path = out_option("Factor directory to write."),
    overwrite: bool = overwrite_option("Replace existing factors in --out."),
) -> None:
    """Merge factor directories into their position-weighted mean."""
    from curvedit.kfac.factors import load_factors, merge_factors, save_factors

    check_output(out, kind="dir", overwrite=overwrite, inputs=parts)
    merged = merge_factors([load_factors(p) for p in parts])
    save_factors(merged, out)
    typer.echo(f"merged {len(parts)} factor sets into {out} "
               f"({next(iter(merged.targets.values())).positions} positions per target)")


def register(app: typer.Typer) -> None:
    """Add `collect` and `merge` to the `curvedit` app."""
    app.command("collect")(collect_command)
    app.command("merge")(merge_command)
