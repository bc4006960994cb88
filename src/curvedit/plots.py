"""Figures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch


def pyplot():
    """The pyplot of matplotlib on the non-interactive Agg backend (imported on first use)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def spans(values: Sequence[float], ratio: float) -> bool:
    """Whether positive finite `values` span more than `ratio` times (then a log axis reads better)."""
    finite = [v for v in values if math.isfinite(v) and v > 0]
    return bool(finite) and len(finite) == len([v for v in values if math.isfinite(v)]) and \
        max(finite) / min(finite) > ratio


def save_figure(fig, out: str | Path) -> Path:
    """Save a matplotlib figure as PNG (parent folders created) and close it."""
    plt = pyplot()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_spectrum(name: str, lam: torch.Tensor, mu: torch.Tensor, curve: tuple[torch.Tensor, torch.Tensor],
                  rho: float | None, kept_fraction: float | None, out: str | Path) -> Path:
    """Eigenvalues of A and G (log scale) and the cumulative curvature-mass curve, with the
    `rho` cut marked, for one target. Writes a PNG and returns its path."""
    plt = pyplot()
    fig, (ax_eig, ax_mass) = plt.subplots(1, 2, figsize=(10, 3.8))
    for values, label in ((lam, "G (output side)"), (mu, "A (input side)")):
        positive = values[values > 0]
        ax_eig.semilogy(torch.linspace(0, 1, len(positive)).numpy(), positive.numpy(),
                        label=f"{label}, d={len(values)}")
    ax_eig.set_xlabel("eigenvalue rank (fraction)")
    ax_eig.set_ylabel("eigenvalue")
    ax_eig.legend(fontsize=8)
    ax_eig.set_title("factor spectra")
    frac, mass = curve
    ax_mass.plot(frac.numpy(), mass.numpy(), color="k")
    ax_mass.set_xscale("log")
    ax_mass.set_xlabel("components kept (fraction, by descending mass)")
    ax_mass.set_ylabel("curvature mass kept")
    if rho is not None and kept_fraction is not None:
        ax_mass.axhline(rho, color="tab:red", ls="--", lw=1)
        ax_mass.axvline(kept_fraction, color="tab:red", ls="--", lw=1,
                        label=f"rho={rho}: {100 * kept_fraction:.2f}% of components")
        ax_mass.legend(fontsize=8, loc="lower right")
    ax_mass.set_title("cumulative mass")
    fig.suptitle(name, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out)
