"""Scale: data-parallel collection throughput, and vectorised vs heap selection.

1. Collection on CPU, 1 process vs 2 gloo processes (127.0.0.1) on the same batches: the
   same random GPT-2, every MLP matrix tracked, one torch thread per process. Each process
   is forked, warmed up on one batch, then timed from a common start; the time of a run is
   its slowest rank. Scaling efficiency = speedup / processes. On a machine whose cores are
   shared with other jobs this is a floor, not what a dedicated node gives.
2. Selection on OLMo-7B-shaped spectra (G: 11008, A: 4096; power-law eigenvalues with a
   little noise so that no products tie; several exponents, since the number of kept pairs,
   hence the heap's work, depends on how fast the spectra decay), rho = 0.6: the selection
   (`curvedit.kfac.spectrum.staircase`: the kept count of every row, which is the whole kept set)
   and the selection plus its `(11008, 4096)` bool mask (`select_by_mass`, what the edit
   multiplies by) vs a pure-Python heap merge in the style of the reference code (a heap over the rows,
   one `.item()` and one heappop per kept pair). When the heap would pop more than
   `--heap-limit` pairs it is timed on that prefix and extrapolated linearly (each pop
   costs O(log rows)); the output says so.

    python benchmarks/bench_scale.py [--part all|collect|select] [--batches 16] [--heap-limit 400000]
"""

from __future__ import annotations

import argparse
import heapq
import os
import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from bench_collect import add_workload_arguments, best_of, random_workload

from curvedit.distributed import current_context, reduce_sums
from curvedit.kfac.collect import CollectOptions, collect_factors
from curvedit.kfac.spectrum import select_by_mass, staircase
from curvedit.kfac.targets import TargetSpec, select_targets


def _collect_worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(minutes=10))
    try:
        model, batches = random_workload(args)
        targets = select_targets(model, TargetSpec(preset="mlp"))
        options = CollectOptions(progress=False)
        collect_factors(model, batches[:world], targets, options=options)  # warm-up (one batch per rank)
        runs = []
        for _ in range(args.repeats):
            if world > 1:
                dist.barrier()
            start, cpu = time.perf_counter(), time.process_time()
            collect_factors(model, batches, targets, options=options)
            # (wall, CPU) seconds of the slowest rank: a run lasts as long as its slowest rank
            spent = torch.tensor([time.perf_counter() - start, time.process_time() - cpu], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(spent, op=dist.ReduceOp.MAX)
            runs.append(spent.tolist())
        wall, cpu = min(runs)
        reduce_s = 0.0
        if world > 1:  # the all-reduce of sums of these sizes alone (what the ranks exchange at the end)
            sums = [torch.zeros(d, d) for t in targets for d in t.shape_oi]
            dist.barrier()
            start = time.perf_counter()
            reduce_sums(sums, [0] * len(targets), 0, current_context(), keep_on_all=True)
            reduce_s = time.perf_counter() - start
        if rank == 0:
            Path(out).write_text(f"{wall} {cpu} {reduce_s} {sum(x.numel() * 4 for x in sums) if world > 1 else 0}")
    finally:
        if world > 1:
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bench_collect(args: argparse.Namespace) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    tokens = args.batches * args.batch_size * args.seq_len
    seconds, cpu = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            out = str(Path(tmp) / f"world{world}.txt")
            mp.start_processes(_collect_worker, args=(world, _free_port(), args, out), nprocs=world, join=True,
                               start_method="fork")
            wall, cpu_s, reduce_s, reduce_bytes = Path(out).read_text().split()
            seconds[world], cpu[world] = float(wall), float(cpu_s)
    speedup = seconds[1] / seconds[2]
    print(f"[collect] GPT-2 {args.layers} blocks x d={args.width}, vocab {args.vocab}, all {2 * args.layers} MLP "
          f"matrices tracked; {args.batches} batches x {args.batch_size} x {args.seq_len} = {tokens} tokens; "
          f"1 thread per process; cpus={os.cpu_count()}, load average {os.getloadavg()[0]:.1f} at the end")
    for world, label in ((1, "1 process          "), (2, "2 processes (gloo)")):
        print(f"  {label}: {seconds[world]:7.3f} s wall  {tokens / seconds[world]:8.0f} tok/s   "
              f"CPU {cpu[world]:6.2f} s in the slowest process  (best of {args.repeats})")
    print(f"  speedup {speedup:.2f}x, scaling efficiency {speedup / 2:.0%}; all-reduce of the sums alone "
          f"({int(reduce_bytes) / 2**20:.0f} MiB): {float(reduce_s):.3f} s")
    print("  wall well above CPU time means the processes waited for a core (other jobs on the machine)")


def _spectra(m: int, n: int, alpha: float, beta: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`lam_i ~ i^-alpha`, `mu_j ~ j^-beta`, times `exp(0.05 z)` noise (no tied products), sorted."""
    gen = torch.Generator().manual_seed(seed)
    noise = lambda k: torch.exp(0.05 * torch.randn(k, generator=gen, dtype=torch.float64))  # noqa: E731
    lam = torch.arange(1, m + 1, dtype=torch.float64).pow(-alpha) * noise(m)
    mu = torch.arange(1, n + 1, dtype=torch.float64).pow(-beta) * noise(n)
    return lam.sort(descending=True).values, mu.sort(descending=True).values


def heap_select(lam: torch.Tensor, mu: torch.Tensor, rho: float, limit: int | None = None) -> tuple[list, bool]:
    """Reference-style selection: a heap merge of the sorted rows `lam_i * mu_j`, one
    `.item()` and one heappop per kept pair, until the kept mass reaches rho * total.

    Returns:
        (kept pairs in pop order, whether the mass was reached before `limit` pops).
    """
    need = rho * (lam.sum() * mu.sum()).item()
    heap = [(-(lam[i] * mu[0]).item(), i, 0) for i in range(lam.shape[0])]
    heapq.heapify(heap)
    kept, mass = [], 0.0
    while mass < need:
        if limit is not None and len(kept) >= limit:
            return kept, False
        neg, i, j = heapq.heappop(heap)
        kept.append((i, j))
        mass += -neg
        if j + 1 < mu.shape[0]:
            heapq.heappush(heap, (-(lam[i] * mu[j + 1]).item(), i, j + 1))
    return kept, True


def bench_select(args: argparse.Namespace) -> None:
    m, n, rho = 11008, 4096, 0.6
    print(f"[select] OLMo-7B-shaped spectra: G {m}, A {n} ({m * n / 1e6:.1f}M pairs), rho {rho}; power law "
          f"lam_i ~ i^-alpha, mu_j ~ j^-beta with 5% noise; {torch.get_num_threads()} torch thread(s)")
    print(f"  {'alpha/beta':>10} {'kept pairs':>11} {'staircase':>12} {'+ mask':>10} {'heap merge':>11} "
          f"{'heap/stair':>9} {'heap/+mask':>9}  note")
    for pair in args.exponents.split(","):
        alpha, beta = (float(x) for x in pair.split(":"))
        lam, mu = _spectra(m, n, alpha, beta)
        need = rho * float(lam.sum()) * float(mu.sum())
        mask = select_by_mass(lam, mu, rho)  # also the warm-up
        t_vec = best_of(lambda lam=lam, mu=mu, need=need: staircase(lam, mu, need, "mass"), 5)
        t_mask = best_of(lambda lam=lam, mu=mu: select_by_mass(lam, mu, rho), 5)
        count = int(mask.sum())
        start = time.perf_counter()
        kept, complete = heap_select(lam, mu, rho, limit=args.heap_limit)
        t_heap = time.perf_counter() - start
        if complete:
            rows = torch.tensor(kept, dtype=torch.long)
            heap_mask = torch.zeros_like(mask)
            heap_mask[rows[:, 0], rows[:, 1]] = True
            note = f"measured; same selection: {bool(torch.equal(heap_mask, mask))}"
        else:
            note = f"EXTRAPOLATED from {t_heap:.1f} s for the first {len(kept)} pops"
            t_heap *= count / len(kept)
        print(f"  {pair:>10} {count:>11} {t_vec * 1e3:>9.1f} ms {t_mask * 1e3:>7.1f} ms {t_heap:>9.2f} s "
              f"{t_heap / t_vec:>8.0f}x {t_heap / t_mask:>8.0f}x  {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["all", "collect", "select"], default="all")
    add_workload_arguments(parser, layers=4, batches=16, repeats=2)
    parser.add_argument("--heap-limit", type=int, default=400_000, help="Most heap pops timed before extrapolating.")
    parser.add_argument("--exponents", default="1.0:1.2,1.0:1.0,0.8:0.8,0.6:0.6",
                        help="alpha:beta power-law exponents of the G and A spectra, comma-separated.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.part in ("all", "collect"):
        bench_collect(args)
    if args.part in ("all", "select"):
        bench_select(args)


if __name__ == "__main__":
    main()
