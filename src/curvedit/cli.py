"""The `curvedit` command: a thin layer over the Python API."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Find and remove verbatim memorization with the curvature of the loss (K-FAC).")


@app.callback()
def main() -> None:
    """curvedit: collect K-FAC factors, edit weights, evaluate memorization."""


@app.command()
def version() -> None:
    """Print the curvedit version."""
    from curvedit import __version__

    typer.echo(__version__)
