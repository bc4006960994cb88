"""Collection throughput against kronfluence and against a plain restatement of the reference method.

Four ways over the same random-initialised GPT-2 (every MLP matrix, `c_fc` and `c_proj`,
tracked) and the same token batches, one torch thread each, best of `--repeats`:

1. plain forward+backward: summed loss on labels sampled from the model, `loss.backward()`
   (every parameter gradient), no hooks. The yardstick.
2. curvedit: `collect_factors` (sampled labels, summed loss, padding/last-position mask,
   `autograd.grad` on the targets' outputs only, no parameter gradient).
3. reference restatement (written out below, not curvedit code): forward hooks keep each
   tracked module's input, full backward hooks its output gradient; mean-reduced
   cross-entropy over every position on sampled labels, `loss.backward()` (parameter
   gradients too), A = sum x x^T and G = sum g g^T over all positions (no mask), float32.
4. kronfluence's covariance pass (`Analyzer.fit_covariance_matrices`, CPU, float32, its
   true-Fisher `compute_train_loss(..., sample=True)`, tracking the same modules, no
   eigendecomposition), in its own environment and process (`kronfluence_worker.py`), on
   the same model (rebuilt from the same weights, `Conv1D` as `nn.Linear`) and batches. Its
   time is kronfluence's own log of the pass, without writing factors. That process also
   times its own plain forward+backward, so its overhead is read against a yardstick of
   the same process too. One worker run per round, alternating with rounds of 1-3.

kronfluence is not a project dependency: on first use the script makes
`benchmarks/.venv-kronfluence` (`python -m venv`, then `pip install torch==<this torch>
kronfluence transformers==<this transformers>`: the pin keeps this machine's CPU torch and
stops pip from pulling another, CUDA, build; then `pip uninstall torchvision`, which
kronfluence requires but never imports, and whose registry build does not load against a
CPU torch and so breaks transformers' imports). `--skip-kronfluence` leaves kronfluence
out; if it cannot be installed or run, the script says so and reports the rest.

Read the ratios: this machine is shared and noisy, absolute times are not. Labels of 1, 3
and 4 are drawn with curvedit's inverse-CDF sampler and its per-batch seeds (`--sampler
multinomial`: `torch.multinomial`, as kronfluence's examples do). Tokens/s counts every
token of every batch. The factors are compared after dividing each by its trace (the
scales differ: mean vs summed loss); A also differs by the last position of each sequence
(counted by 3 and 4, not by curvedit, as it has no next token), G by the labels drawn: a
second curvedit run with another label seed gives that noise floor.

    python benchmarks/bench_reference.py [--layers 4] [--width 256] [--batches 8] [--repeats 3] \
        [--sampler cdf|multinomial]
        [--skip-kronfluence] [--kronfluence-mask]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from curvedit.kfac.collect import CollectOptions, collect_factors
from curvedit.kfac.targets import TargetSpec, select_targets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_collect import add_workload_arguments, gpt2_config, random_workload  # noqa: E402
from kronfluence_worker import SAMPLERS, batch_generator, plain_forward_backward, sample_labels  # noqa: E402

HERE = Path(__file__).resolve().parent
KRON_VENV = HERE / ".venv-kronfluence"
WORKER = HERE / "kronfluence_worker.py"


# --- Plain restatement of the reference method (not curvedit code) --------------------------
class ReferenceCollector:
    """The reference method as plainly stated: forward hooks keep each module's input, full
    backward hooks its output gradient; mean-reduced loss over every position, labels
    sampled from the model, `loss.backward()`; A and G summed over all positions, float32."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules

    def run(self, model: nn.Module, batches: list[dict], sampler: str, seed: int = 0):
        a_sum, g_sum, positions = {}, {}, {}

        def forward_hook(name):
            def hook(_module, inputs, _output):
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
                if name in a_sum:
                    a_sum[name].addmm_(x.T, x)
                else:
                    a_sum[name] = x.T @ x
                positions[name] = positions.get(name, 0) + x.shape[0]
            return hook

        def backward_hook(name):
            def hook(_module, _grad_input, grad_output):
                g = grad_output[0].detach().reshape(-1, grad_output[0].shape[-1]).float()
                if name in g_sum:
                    g_sum[name].addmm_(g.T, g)
                else:
                    g_sum[name] = g.T @ g
            return hook

        handles = []
        for name, module in self.modules.items():
            handles.append(module.register_forward_hook(forward_hook(name)))
            handles.append(module.register_full_backward_hook(backward_hook(name)))
        try:
            for index, batch in enumerate(batches):
                model.zero_grad(set_to_none=True)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                flat = logits.reshape(-1, logits.shape[-1])
                labels = sample_labels(flat, batch_generator(seed, index), sampler)
                F.cross_entropy(flat.float(), labels).backward()  # mean over every position
        finally:
            for handle in handles:
                handle.remove()
            model.zero_grad(set_to_none=True)
        return a_sum, g_sum, positions
# ----------------------------------------------------------------------------------------------


def ensure_kronfluence(venv: Path) -> tuple[Path | None, str]:
    """The kronfluence environment's python (made on first use), and what happened."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import kronfluence, torch, transformers; "
             "print(kronfluence.__version__, torch.__version__, transformers.__version__)"]
    if python.exists():
        found = subprocess.run(probe, capture_output=True, text=True, env=worker_env())
        if found.returncode == 0:
            return python, "found {} (kronfluence, torch, transformers: {})".format(venv, found.stdout.strip())
    torch_pin = torch.__version__.split("+")[0]
    requirements = [f"torch=={torch_pin}", "kronfluence", f"transformers=={transformers.__version__}"]
    print(f"setting up {venv}: pip install {' '.join(requirements)} ...", flush=True)
    start = time.perf_counter()
    # kronfluence requires torchvision but never imports it; the registry's torchvision build
    # fails to load against a CPU torch and then breaks transformers' imports: remove it.
    steps = [[sys.executable, "-m", "venv", "--clear", str(venv)],
             [str(python), "-m", "pip", "install", "--quiet", *requirements],
             [str(python), "-m", "pip", "uninstall", "--quiet", "--yes", "torchvision"]]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=1200)
        except (OSError, subprocess.TimeoutExpired) as error:
            return None, f"setup failed: {' '.join(step[:4])} ...: {error}"
        if done.returncode != 0:
            tail = "\n    ".join((done.stderr or done.stdout).strip().splitlines()[-6:])
            return None, f"setup failed: {' '.join(step[:4])} ... exited {done.returncode}:\n    {tail}"
    found = subprocess.run(probe, capture_output=True, text=True, env=worker_env())
    if found.returncode != 0:
        return None, f"installed, but kronfluence does not import: {found.stderr.strip().splitlines()[-1:]}"
    return python, (f"made {venv} in {time.perf_counter() - start:.0f} s "
                    f"(kronfluence, torch, transformers: {found.stdout.strip()})")


def worker_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    env.pop("PYTHONPATH", None)
    return env


def run_kronfluence(python: Path, spec_path: Path, out_path: Path) -> dict:
    done = subprocess.run([str(python), str(WORKER), str(spec_path), str(out_path)], capture_output=True, text=True,
                          env=worker_env(), timeout=1800)
    if done.returncode != 0:
        raise RuntimeError("kronfluence worker exited {}:\n    {}".format(
            done.returncode, "\n    ".join(done.stderr.strip().splitlines()[-12:])))
    return torch.load(out_path, weights_only=False)


@torch.no_grad()
def inputs_over_every_position(model: nn.Module, batches: list[dict], targets) -> dict[str, torch.Tensor]:
    """sum x x^T of each target's input over every position (a plain forward with hooks)."""
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def keep(_module, inputs, _output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums[name] + x.T @ x if name in sums else x.T @ x
        return keep

    handles = [t.module.register_forward_hook(hook(t.name)) for t in targets]
    try:
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()
    return sums


def rel_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """||x/tr x - y/tr y||_F / ||y/tr y||_F (float64)."""
    x, y = x.double() / x.double().trace(), y.double() / y.double().trace()
    return float((x - y).norm() / y.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser, layers=4, batches=8, repeats=3)
    parser.add_argument("--sampler", choices=SAMPLERS, default="cdf",
                        help="label sampler of the plain, reference and kronfluence runs")
    parser.add_argument("--skip-kronfluence", action="store_true")
    parser.add_argument("--kronfluence-mask", action="store_true",
                        help="kronfluence's get_attention_mask returns the batch's mask (as its examples do); "
                             "default None, its cheapest path, right for these unpadded batches")
    parser.add_argument("--kronfluence-venv", type=Path, default=KRON_VENV)
    args = parser.parse_args()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()

    python, kron_note = None, "skipped (--skip-kronfluence)"
    if not args.skip_kronfluence:
        start = time.perf_counter()
        python, kron_note = ensure_kronfluence(args.kronfluence_venv)
        kron_note += f"; setup step took {time.perf_counter() - start:.1f} s wall"
        print(f"kronfluence environment: {kron_note}", flush=True)

    config = gpt2_config(args)  # the kronfluence worker rebuilds the model from it and the weights
    model, batches = random_workload(args)
    targets = select_targets(model, TargetSpec(preset="mlp"))
    reference = ReferenceCollector({t.name: t.module for t in targets})
    options = CollectOptions(progress=False)
    tokens = args.batches * args.batch_size * args.seq_len

    tmp = tempfile.TemporaryDirectory(prefix="bench-reference-")
    spec_path, out_path = Path(tmp.name) / "spec.pt", Path(tmp.name) / "result.pt"
    torch.save({"config": config, "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
                "batches": batches, "tracked": [t.name for t in targets], "sampler": args.sampler, "seed": 0,
                "repeats": 1, "mask": args.kronfluence_mask}, spec_path)

    def timed(fn):
        start = time.perf_counter()
        result = fn()
        return time.perf_counter() - start, result

    plain_forward_backward(model, batches[:1], args.sampler)  # warm up every path
    collect_factors(model, batches[:1], targets, options=options)
    reference.run(model, batches[:1], args.sampler)
    times: dict[str, list[float]] = {"plain": [], "curvedit": [], "reference": [], "kron": [], "kron_plain": []}
    kron_result = None
    for _ in range(args.repeats):
        times["plain"].append(timed(lambda: plain_forward_backward(model, batches, args.sampler))[0])
        t, ours = timed(lambda: collect_factors(model, batches, targets, options=options))
        times["curvedit"].append(t)
        t, ref = timed(lambda: reference.run(model, batches, args.sampler))
        times["reference"].append(t)
        if python is not None:
            try:
                kron_result = run_kronfluence(python, spec_path, out_path)
            except (RuntimeError, subprocess.TimeoutExpired) as error:
                kron_note, python = f"could not run: {error}", None
                continue
            times["kron"] += kron_result["covariance_s"]
            times["kron_plain"] += kron_result["plain_s"]
    other_seed = collect_factors(model, batches, targets, options=CollectOptions(progress=False, seed=1))
    tmp.cleanup()

    best = {k: min(v) for k, v in times.items() if v}
    print(f"GPT-2 {args.layers} blocks x d={args.width}, vocab {args.vocab}; {args.batches} batches x "
          f"{args.batch_size} x {args.seq_len} = {tokens} tokens; tracked: {len(targets)} MLP matrices "
          f"(c_fc, c_proj, every block); threads={torch.get_num_threads()} per process; best of {args.repeats}; "
          f"labels: curvedit's sampler, others {args.sampler!r}")
    rows = [("plain forward+backward", "plain"), ("curvedit collect_factors", "curvedit"),
            ("reference restatement (hooks)", "reference"), ("kronfluence covariance pass", "kron"),
            ("  its process's plain fwd+bwd", "kron_plain")]
    print(f"{'':32s}{'time (s)':>9s}{'tok/s':>10s}   {'/ plain of its process':>22s}")
    for label, key in rows:
        if key not in best:
            continue
        yardstick = best["kron_plain"] if key.startswith("kron") else best["plain"]
        print(f"{label:32s}{best[key]:9.3f}{tokens / best[key]:10.0f}   {best[key] / yardstick:21.2f}x")
    if "kron" not in best:
        print(f"kronfluence: not run: {kron_note}")
    print()
    print(f"curvedit / plain fwd+bwd (time)              : {best['curvedit'] / best['plain']:.2f}x  (target <= 1.3x)")
    if "kron" in best:
        print(f"curvedit / kronfluence throughput            : {best['kron'] / best['curvedit']:.2f}x  "
              "(target >= 1.5x)")
        overhead_ratio = (best["kron"] / best["kron_plain"]) / (best["curvedit"] / best["plain"])
        print(f"  same, each timed against its own process's plain fwd+bwd: {overhead_ratio:.2f}x")
        print(f"  kronfluence {kron_result['kronfluence']}, torch {kron_result['torch']}, transformers "
              f"{kron_result['transformers']}, {kron_result['examples']} sequences per pass, "
              f"get_attention_mask: {'the batch mask' if args.kronfluence_mask else 'None'}")
    print(f"curvedit / reference restatement throughput  : {best['reference'] / best['curvedit']:.2f}x")

    print()
    print("factors, each divided by its trace: ||X - Y||_F / ||Y||_F, median / max over the "
          f"{len(targets)} matrices")
    print("  Y = curvedit's A and G; A(all) = sum x x^T over every position, last ones included (a plain forward):")
    print("  curvedit does not count the last position of a sequence (no next token), the other two do; G")
    print("  differs by the labels drawn (another seed of curvedit's gives the noise floor) and the loss scale.")
    a_all = inputs_over_every_position(model, batches, targets)
    comparisons = [("curvedit, label seed 1", {n: (f.A, f.G) for n, f in other_seed.targets.items()})]
    comparisons.append(("reference restatement", {n: (ref[0][n], ref[1][n]) for n in ref[0]}))
    if kron_result is not None:
        kron_factors = {}
        for name, f in kron_result["factors"].items():
            a = f["A"]  # kronfluence appends a constant 1 to the inputs of a module with a bias
            kron_factors[name] = (a[:-1, :-1] if a.shape[0] == ours.targets[name].A.shape[0] + 1 else a, f["G"])
        comparisons.append(("kronfluence", kron_factors))
    print(f"  {'':26s}{'A vs curvedit':>22s}{'A vs A(all)':>22s}{'G vs curvedit':>22s}")
    for label, factors in comparisons:
        cells = []
        for diffs in ([rel_diff(a, ours.targets[n].A) for n, (a, _) in factors.items()],
                      [rel_diff(a, a_all[n]) for n, (a, _) in factors.items()],
                      [rel_diff(g, ours.targets[n].G) for n, (_, g) in factors.items()]):
            diffs.sort()
            cells.append(f"{diffs[len(diffs) // 2]:.1e} / {diffs[-1]:.1e}")
        print(f"  {label:26s}" + "".join(f"{c:>22s}" for c in cells))


if __name__ == "__main__":
    main()
