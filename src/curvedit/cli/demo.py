"""The `curvedit demo` command: the whole method on a synthetic world (or the ViT demo)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from curvedit.cli.common import ProgressOpt, out_option, overwrite_option, reuse_output


def demo_command(
    out: Optional[Path] = out_option("Folder for the report and results (default demo-out, with --vision "
                                     "demo-out/vision).", default=None),
    retrain: bool = typer.Option(False, "--retrain", help="Train the demo model even if a matching one exists."),
    smoke: bool = typer.Option(False, "--smoke", help="A seconds-long run on a tiny world (checks the plumbing)."),
    full: bool = typer.Option(False, "--full", help="Also durability attacks, EK-FAC, the targeted edit, "
                                                    "BalancedSubnet, label-seed spread, convergence, the layer map "
                                                    "and the band analysis (what docs/demo/ holds)."),
    vision: bool = typer.Option(False, "--vision", help="Instead: a ViT that memorizes noisy labels in a "
                                                        "generated glyph world, and the edit that undoes it."),
    overwrite: bool = overwrite_option("Replace report files in --out that curvedit did not write there."),
    progress: bool = ProgressOpt,
) -> None:
    """Run the paper end to end on a synthetic world: train, find, collect, sweep, edit, report."""
    if vision:
        from curvedit.experiments.demo.vision import VisionDemoOptions, run_vision_demo, smoke_vision_options
        from curvedit.experiments.demo.vision_report import vision_table

        out = out or Path("demo-out/vision")
        reuse_output(out, overwrite)  # the folder caches the trained model
        vision_options = smoke_vision_options(out) if smoke else VisionDemoOptions(out=out)
        vision_options.retrain, vision_options.progress = retrain, progress and not smoke
        results = run_vision_demo(vision_options)
        typer.echo(vision_table(results))
        typer.echo(f"\nreport: {out / 'report.md'}  results: {out / 'results.json'}  "
                   f"total {sum(results['timings_s'].values()):.0f} s")
        return
    from curvedit.experiments.demo.pipeline import DemoOptions, run_demo, smoke_options
    from curvedit.experiments.demo.report import family_table, memorization_table, timings_table

    out = out or Path("demo-out")
    reuse_output(out, overwrite)  # the folder caches the trained model
    options = smoke_options(out, full=full) if smoke else DemoOptions(out=out, full=full)
    options.retrain, options.progress = retrain, progress and not smoke
    results = run_demo(options)
    typer.echo(memorization_table(results))
    typer.echo("")
    typer.echo(family_table(results))
    typer.echo("")
    typer.echo(timings_table(results["timings_s"]))
    typer.echo(f"\nreport: {out / 'report.md'}  results: {out / 'results.json'}  "
               f"total {sum(results['timings_s'].values()):.0f} s"
               + ("" if full else "  (curvedit demo --full: the stages beyond the headline)"))


def register(app: typer.Typer) -> None:
    """Add `demo` to the `curvedit` app."""
    app.command("demo")(demo_command)
