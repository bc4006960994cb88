"""Selection and edit speed.

1. Selection by curvature mass on an OLMo-7B-MLP-shaped spectrum (11008 x 4096 pairs):
   our threshold search against a full sort of all 45M products (the simplest exact
   alternative), both in this process.
2. The whole edit of one weight (eigh of both factors, selection, basis change, write
   back) against the unavoidable linear algebra alone (two float64 `eigh` and the four
   matrix products), in the same process. Default shape is a quarter of OLMo-7B's
   (2752 x 1024); `--full` uses 11008 x 4096 (minutes of float64 eigh on 2 cores).

    python benchmarks/bench_edit.py [--full]
"""

from __future__ import annotations

import argparse
import time

import torch

from curvedit.editing.edit import EditPlan, EditRule, apply_edit
from curvedit.kfac.factors import TargetFactors
from curvedit.kfac.spectrum import eigenbasis, select_by_mass, sym_eigh
from curvedit.kfac.targets import TargetSpec, select_targets


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def power_law(n: int, exponent: float, generator: torch.Generator) -> torch.Tensor:
    values = torch.arange(1, n + 1, dtype=torch.float64) ** -exponent
    return (values * (1 + 0.05 * torch.rand(n, generator=generator, dtype=torch.float64))).sort(descending=True).values


def bench_selection(generator: torch.Generator) -> None:
    lam, mu = power_law(11008, 1.1, generator), power_law(4096, 0.8, generator)
    select_by_mass(lam, mu, 0.6)  # warm-up
    mask, t_ours = timed(lambda: select_by_mass(lam, mu, 0.6))

    def sort_all():
        prod = (lam[:, None] * mu[None, :]).flatten()
        order = torch.sort(prod, descending=True, stable=True).indices
        k = int((prod[order].cumsum(0) < 0.6 * float(prod.sum())).sum()) + 1
        return k

    k, t_sort = timed(sort_all)
    assert int(mask.sum()) == k, (int(mask.sum()), k)
    print(f"selection 11008 x 4096 (rho=0.6, {k} of {lam.numel() * mu.numel()} kept): ours {t_ours:.3f} s, "
          f"full sort {t_sort:.3f} s, ratio {t_sort / t_ours:.1f}x")


def random_factor(d: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(d + 64, d, generator=generator) * power_law(d, 0.5, generator).float()
    return (x.T @ x) / (d + 64)


def bench_edit(d_out: int, d_in: int, generator: torch.Generator) -> None:
    factors = TargetFactors(A=random_factor(d_in, generator), G=random_factor(d_out, generator), positions=1)
    layer = torch.nn.Linear(d_in, d_out, bias=False)
    target = select_targets(torch.nn.Sequential(layer), TargetSpec(patterns=("0",)))[0]
    weight = layer.weight.detach().double()

    def unavoidable():
        lam, u_g = sym_eigh(factors.G)
        mu, u_a = sym_eigh(factors.A)
        coeffs = u_g.T @ weight @ u_a
        return u_g @ coeffs @ u_a.T

    _, t_floor = timed(unavoidable)

    def ours():
        bases = {target.name: eigenbasis(factors)}
        return apply_edit([target], EditPlan([EditRule(rho=0.6)]), bases)

    _, t_ours = timed(ours)
    print(f"edit {d_out} x {d_in}: ours {t_ours:.2f} s, unavoidable linear algebra {t_floor:.2f} s, "
          f"ratio {t_ours / t_floor:.2f}x (target <= 1.5x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true", help="edit at the full 11008 x 4096 shape")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    print(f"threads={torch.get_num_threads()}")
    bench_selection(generator)
    bench_edit(*((11008, 4096) if args.full else (2752, 1024)), generator)


if __name__ == "__main__":
    main()
