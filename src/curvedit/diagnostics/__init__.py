"""Analyses built on edits: where memorization sits, what undoes an edit, and the controls.

Modules:
    analysis: the curvature-band analysis of memorized and general inputs.
    converge: how many tokens the factors need (captured curvature mass against a reference).
    ablate: sublayer ablation.
    attack: durability attacks (relearning, quantization).
    flat_energy: the label-free score, the share of input energy in the flattest directions.
    frontier: forgetting against cost for every method on one figure.
    layer_map: the forgetting each placement buys per unit of cost.
"""

from curvedit.diagnostics.analysis import AnalysisError, BandOptions, band_analysis
from curvedit.diagnostics.attack import AttackError, RelearnOptions, quantized, relearn_curve
from curvedit.diagnostics.converge import ConvergeOptions, run_convergence
from curvedit.diagnostics.flat_energy import FlatEnergyError, flat_energy_shares, screen_savings
from curvedit.diagnostics.frontier import FrontierError, FrontierOptions, run_frontier
from curvedit.diagnostics.layer_map import LayerMapError, LayerMapOptions

__all__ = [
    "AnalysisError", "AttackError", "BandOptions", "ConvergeOptions", "FlatEnergyError", "FrontierError",
    "FrontierOptions", "LayerMapError", "LayerMapOptions", "RelearnOptions", "band_analysis", "flat_energy_shares",
    "quantized", "relearn_curve", "run_convergence", "run_frontier", "screen_savings",
]
