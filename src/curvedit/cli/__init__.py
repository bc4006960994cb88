"""The `curvedit` command: a thin layer over the Python API.

One module per command group, each adding its commands with `register(app)`:
`collect` (collect, merge), `edit` (edit, spectrum), `evaluate` (find-memorized, evaluate,
report), `sweep` (sweep, analyze), `baseline` (baseline bsn), `implant`, `attack` (attack
relearn, attack quantize), `sample` (sample, capabilities), `converge`, `study` (study
smollm2) and `demo`. `common` holds what they share: the options, the output guard and the
error handler every command runs inside (errors print one line `error: ...`, exit status 2).
"""

from __future__ import annotations

import typer

from curvedit import __version__
from curvedit.cli import attack, baseline, collect, converge, demo, edit, evaluate, implant, sample, study, sweep
from curvedit.cli.common import CurveditGroup, fail, target_spec

__all__ = ["app", "fail", "target_spec"]

app = typer.Typer(cls=CurveditGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Find and remove verbatim memorization with the curvature of the loss (K-FAC).")


@app.callback()
def main() -> None:
    """curvedit: collect K-FAC factors, edit weights, evaluate memorization."""


@app.command()
def version() -> None:
    """Print the curvedit version."""
    typer.echo(__version__)


for _module in (collect, edit, evaluate, sweep, baseline, implant, sample, attack, converge, study, demo):
    _module.register(app)
