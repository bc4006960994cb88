"""Baselines the K-FAC edit is compared with (docs/method.md section 10).

Modules:
    balanced_subnet: BalancedSubnet (Sakarvadia et al. 2025), a learned sparse mask over
        MLP weights that needs a forget set.

The data-free controls (SVD truncation, random and lowest-mass components) share the edit's
plan shape and live in `curvedit.edit` (`EditPlan(method="svd" | "random" | "lowest")`).
"""
