"""Curvature: which weights to edit, the K-FAC factors, and their eigenbasis.

Modules:
    targets: the weights an edit may touch (`TargetSpec`, `select_targets`).
    objectives: the loss whose curvature is measured (causal LM, image classifier, custom).
    collect: K-FAC factor collection (A, G) with sampled labels, resumable.
    memory: the memory plan of a collection (`plan_memory`).
    factors: the factor files (`save_factors`, `load_factors`).
    eigencorrect: EK-FAC masses in the Kronecker eigenbasis.
    spectrum: eigenbases and the selection of components by curvature mass.
"""

from curvedit.kfac.collect import CollectError, CollectOptions, collect_factors
from curvedit.kfac.eigencorrect import eigencorrect_factors
from curvedit.kfac.factors import FactorError, FactorSet, TargetFactors, load_factors, save_factors
from curvedit.kfac.memory import MemoryPlan, plan_memory
from curvedit.kfac.objectives import CausalLMObjective, CustomObjective, ImageClassificationObjective, Objective
from curvedit.kfac.spectrum import (
    Eigenbasis,
    SelectionError,
    eigenbasis,
    load_bases,
    mass_curve,
    select_by_count,
    select_by_mass,
    staircase,
    sym_eigh,
)
from curvedit.kfac.targets import Target, TargetError, TargetSpec, select_targets

__all__ = [
    "CausalLMObjective", "CollectError", "CollectOptions", "CustomObjective", "Eigenbasis", "FactorError",
    "FactorSet", "ImageClassificationObjective", "MemoryPlan", "Objective", "SelectionError", "Target",
    "TargetError", "TargetFactors", "TargetSpec", "collect_factors", "eigenbasis", "eigencorrect_factors",
    "load_bases", "load_factors", "mass_curve", "plan_memory", "save_factors", "select_by_count", "select_by_mass",
    "select_targets", "staircase", "sym_eigh",
]
