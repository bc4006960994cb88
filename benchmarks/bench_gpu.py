"""GPU benchmark: factor collection on a ~1B-parameter model, and eigh / edit at LLM shapes.

Everything runs in this process on one device. A time is wall-clock between two device
synchronisations (`torch.cuda.synchronize` on CUDA), best of `--repeats`, after a warm-up
of the same path; ratios against a baseline measured in the same process are what to
read across machines.

1. Model: a randomly initialised OLMo-2 (`--arch llama`: Llama) causal LM in bfloat16,
   hidden 2048, MLP 8192, 16 blocks, 16 heads, vocab 50304, untied embeddings
   (about 1.28B parameters; nothing is downloaded). Batches of random tokens,
   `--batches` x `--batch-size` x `--seq-len` (default 8 x 8 x 1024 = 65536 tokens), on
   the device before timing.
2. Collection: `curvedit.kfac.collect.collect_factors` (sampled labels, float32 accumulators)
   on the MLP matrices (gate/up/down) of the last `--few-blocks` blocks and of all
   blocks (in one pass if the memory plan says it fits, else the largest
   `layers_per_pass` that fits), against two plain forward+backward passes over the same
   batches:
   - "train-style": the HF loss on gold labels, `loss.backward()` with every parameter
     gradient (a training step without the optimizer);
   - "collector's objective": the collector's own loss (sampled labels, summed NLL), but
     only activation gradients (no parameter gradient), from the embedding output on;
     the backward the collector needs, without hooks and accumulation.
   A collection call has a fixed part (moving the factors to CPU, SHA-256 of the target
   weights) and a per-batch part: both are reported, from a one-batch and an N-batch
   call. The per-batch part is also compared with "collector's objective" plus the float32
   covariance matmuls alone (`addmm` of `x^T x` and `g^T g` for every target, TF32 off as
   in the collector): the work that cannot be avoided. The memory plan
   (`curvedit.kfac.memory.plan_memory`) is printed with the measured peak.
3. Eigendecomposition (`curvedit.kfac.spectrum.sym_eigh`) of random PSD matrices of sizes
   8192, 2048, 11008, 4096 (the K-FAC factors of 8192 x 2048 and 11008 x 4096 MLP
   weights) in float64 and in float32 with its
   residual check (falls back to float64 when the check fails); a raw float32
   `torch.linalg.eigh` for reference. Accuracy: `||A V - V diag(w)||_F / ||A||_F` and
   `||V^T V - I||_F / sqrt(d)`, in float64.
4. The edit at 8192 x 2048 and 11008 x 4096: selection (`select_by_mass`, rho 0.6) and
   basis change + mask (`change_basis_and_mask`, including the cast of the basis) in
   float64 and float32. Accuracy: float32 against float64, next to the bfloat16 round-off
   of the edited weight (what writing it back into a bf16 model costs anyway).

    python benchmarks/bench_gpu.py                 # one H100: 2-4 minutes estimated, not yet measured (budget: 8)
    python benchmarks/bench_gpu.py --quick         # fewer batches and repeats
    python benchmarks/bench_gpu.py --arch llama [--parts collect|linalg]
    OMP_NUM_THREADS=1 python benchmarks/bench_gpu.py --device cpu --tiny   # smoke test, < 1 min
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import transformers

from curvedit.editing.edit import change_basis_and_mask
from curvedit.kfac import spectrum
from curvedit.kfac.collect import CollectOptions, batch_generator, collect_factors, no_tf32
from curvedit.kfac.memory import plan_memory
from curvedit.kfac.objectives import CausalLMObjective
from curvedit.kfac.spectrum import Eigenbasis, mass_fraction, select_by_mass, sym_eigh
from curvedit.kfac.targets import Target, TargetSpec, select_targets

SIZES = {
    "full": {"hidden": 2048, "intermediate": 8192, "layers": 16, "heads": 16, "vocab": 50304},
    "tiny": {"hidden": 64, "intermediate": 256, "layers": 2, "heads": 4, "vocab": 512},
}
EDIT_SHAPES = {"full": [(8192, 2048), (11008, 4096)], "tiny": [(256, 64), (344, 128)]}
RHO = 0.6
GIB = 1024 ** 3


# ---------------------------------------------------------------------------- timing

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, repeats: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """(result of the last call `fn(*args, **kwargs)`, best wall time in seconds), the device
    synchronised around each call."""
    best, out = math.inf, None
    for _ in range(max(1, repeats)):
        out = None  # free the previous result before the next call
        sync(device)
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return out, best


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_text(device: torch.device) -> str:
    if device.type != "cuda":
        return ""
    return f", peak {torch.cuda.max_memory_allocated(device) / GIB:.1f} GiB"


def size_text(n: int) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


class Stopwatch:
    """Per-part elapsed time lines, and the total."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()

    def part(self, name: str) -> None:
        now = time.perf_counter()
        print(f"[{name} took {now - self.last:.1f} s; {now - self.start:.1f} s so far]", flush=True)
        self.last = now


# ---------------------------------------------------------------------------- model and data

def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    size = SIZES["tiny" if args.tiny else "full"]
    config_class = transformers.Olmo2Config if args.arch == "olmo2" else transformers.LlamaConfig
    config = config_class(hidden_size=size["hidden"], intermediate_size=size["intermediate"],
                          num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                          num_key_value_heads=size["heads"], vocab_size=size["vocab"],
                          max_position_embeddings=max(args.seq_len, 2048), tie_word_embeddings=False,
                          pad_token_id=1, bos_token_id=None, eos_token_id=size["vocab"] - 1)
    torch.manual_seed(0)
    with torch.device(device):  # initialise in place on the device, directly in `dtype`
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=args.attn)
    return model.eval()


def random_batches(args: argparse.Namespace, vocab: int, device: torch.device, count: int) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=generator).to(device),
             "attention_mask": torch.ones(args.batch_size, args.seq_len, dtype=torch.long, device=device)}
            for _ in range(count)]


# ---------------------------------------------------------------------------- baselines

def train_style(model: torch.nn.Module, batches: list[dict]) -> None:
    """HF loss on gold labels, every parameter gradient (a training step without the optimizer)."""
    for batch in batches:
        model.zero_grad(set_to_none=True)
        model(**batch, labels=batch["input_ids"]).loss.backward()


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def objective_backward(model: torch.nn.Module, batches: list[dict], seed: int = 0) -> None:
    """The collector's loss (sampled labels, summed NLL, same label sampler), backpropagated
    to the embedding output only: activation gradients, no parameter gradient, no hooks on
    the targets, no accumulation."""
    objective = CausalLMObjective("sampled")
    device = next(model.parameters()).device
    leaves: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        output.requires_grad_(True)  # a leaf: the embedding weight is frozen
        leaves.append(output)
        return output

    handle = model.get_input_embeddings().register_forward_hook(hook)
    try:
        with frozen(model):
            for index, batch in enumerate(batches):
                leaves.clear()
                out = objective(model, batch, batch_generator(seed, index, device))
                torch.autograd.grad(out.loss, leaves)
    finally:
        handle.remove()
        leaves.clear()


def covariance_floor(targets: list[Target], rows: int, device: torch.device, repeats: int) -> float:
    """Seconds per batch of the float32 `addmm_(x.T, x)` for every A and G of the targets
    (`rows` counted positions per batch), TF32 off as in the collector."""
    dims: dict[int, int] = {}
    for target in targets:
        for d in target.shape_oi:
            dims[d] = dims.get(d, 0) + 1
    total = 0.0
    with no_tf32():
        for d, count in dims.items():
            x = torch.randn(rows, d, device=device)
            acc = torch.zeros(d, d, device=device)
            acc.addmm_(x.T, x)  # warm-up
            _, seconds = timed(device, repeats, acc.addmm_, x.T, x)
            total += count * seconds
            del x, acc
    return total


# ---------------------------------------------------------------------------- part 1: collection

def collect_once(model, batches, targets, layers_per_pass) -> None:
    options = CollectOptions(progress=False, accumulate_dtype="float32", layers_per_pass=layers_per_pass)
    factors = collect_factors(model, batches, targets, options=options)
    del factors


def fitting_layers_per_pass(model, targets, args, device):
    """(layers_per_pass, plan, fits): one pass (None) if the plan fits, else the most blocks per
    pass that fit; fits False when even one block per pass does not."""
    release(device)
    blocks = len({t.layer for t in targets})
    plan = None
    for k in [None, *range(blocks - 1, 0, -1)]:
        plan = plan_memory(model, targets, batch_size=args.batch_size, seq_len=args.seq_len,
                           accumulate_dtype="float32", layers_per_pass=k, device=device)
        if plan.fits:
            return k, plan, True
    return None, plan, False


def bench_collect(model, args, device, watch: Stopwatch) -> None:
    layers = model.config.num_hidden_layers
    batches = random_batches(args, model.config.vocab_size, device, args.batches)
    tokens = args.batches * args.batch_size * args.seq_len
    counted_rows = args.batch_size * (args.seq_len - 1)  # the last position of a sequence never counts
    print(f"data: {args.batches} batches x {args.batch_size} x {args.seq_len} random tokens = {tokens} tokens "
          f"({counted_rows} counted positions per batch)")

    # Baselines (warm-up on one batch first).
    train_style(model, batches[:1])
    model.zero_grad(set_to_none=True)
    reset_peak(device)
    _, t_train = timed(device, args.repeats, train_style, model, batches)
    train_peak = peak_text(device)
    model.zero_grad(set_to_none=True)
    release(device)
    objective_backward(model, batches[:1])
    reset_peak(device)
    _, t_obj = timed(device, args.repeats, objective_backward, model, batches)
    obj_peak = peak_text(device)
    release(device)
    print(f"plain fwd+bwd, train-style (gold labels, HF mean loss, all parameter grads): "
          f"{t_train:8.3f} s  {tokens / t_train:9.0f} tok/s{train_peak}")
    print(f"plain fwd+bwd, collector's objective (sampled labels, activation grads only): "
          f"{t_obj:8.3f} s  {tokens / t_obj:9.0f} tok/s{obj_peak}")
    watch.part("baselines")

    few = max(1, min(args.few_blocks, layers - 1)) if layers > 1 else 1
    last_few = select_targets(model, TargetSpec(preset="mlp", layers=f"{layers - few}-{layers - 1}"))
    groups = [(f"last {few} block{'s' if few > 1 else ''}", last_few, args.repeats)]
    if few < layers:
        groups.append((f"all {layers} blocks", select_targets(model, TargetSpec(preset="mlp")), 1))
    collect_once(model, batches[:1], groups[0][1], None)  # warm-up (the kernels are the same for every group)
    release(device)

    for label, targets, repeats in groups:
        layers_per_pass, plan, fits = fitting_layers_per_pass(model, targets, args, device)
        print(f"\ncollect, {label}: {len(targets)} MLP matrices, float32 accumulators")
        print(plan.table())
        if not fits:
            print("  skipped: does not fit even one block per pass")
            continue
        if layers_per_pass is not None:
            print(f"  (one pass does not fit: using layers_per_pass={layers_per_pass})")
        _, t_one = timed(device, repeats, collect_once, model, batches[:1], targets, layers_per_pass)
        release(device)
        reset_peak(device)
        _, t_all = timed(device, repeats, collect_once, model, batches, targets, layers_per_pass)
        measured_peak = peak_text(device)
        release(device)
        per_batch = max(1e-9, (t_all - t_one) / (args.batches - 1) if args.batches > 1 else t_all)
        fixed = max(0.0, t_one - per_batch)
        floor = covariance_floor(targets, counted_rows, device, args.repeats)
        release(device)
        obj_per_batch = t_obj / args.batches
        print(f"  collect {args.batches} batches : {t_all:8.3f} s  {tokens / t_all:9.0f} tok/s{measured_peak} "
              f"(plan: {size_text(plan.peak_bytes)})")
        print(f"  per call, fixed        : {fixed:8.3f} s  (factors to CPU, weight hashes)")
        print(f"  per batch              : {per_batch:8.3f} s  {args.batch_size * args.seq_len / per_batch:9.0f} "
              f"tok/s steady state")
        print(f"  ratio to train-style          : {t_all / t_train:5.2f}x end to end, "
              f"{per_batch / (t_train / args.batches):5.2f}x per batch")
        print(f"  ratio to collector's objective: {t_all / t_obj:5.2f}x end to end, "
              f"{per_batch / obj_per_batch:5.2f}x per batch")
        print(f"  unavoidable per batch  : {obj_per_batch + floor:8.3f} s  (objective fwd+bwd {obj_per_batch:.3f} s "
              f"+ float32 covariance matmuls {floor:.3f} s); collect per batch / unavoidable: "
              f"{per_batch / (obj_per_batch + floor):.2f}x")
        watch.part(f"collect, {label}")
    del batches
    release(device)


# ---------------------------------------------------------------------------- parts 2-3: eigh and edit

def power_law(n: int, exponent: float, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    values = torch.arange(1, n + 1, dtype=torch.float64, device=device) ** -exponent
    noise = 1 + 0.05 * torch.rand(n, generator=generator, dtype=torch.float64, device=device)
    return (values * noise).sort(descending=True).values


def random_psd(d: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """A float64 `(d, d)` PSD matrix with a power-law spectrum (roughly `1/j`), like a K-FAC factor."""
    x = torch.randn(d + 64, d, generator=generator, dtype=torch.float64, device=device)
    x *= power_law(d, 0.5, device, generator)
    return (x.T @ x) / (d + 64)


def eig_errors(a: torch.Tensor, w: torch.Tensor, v: torch.Tensor) -> tuple[float, float]:
    """(||A V - V diag(w)||_F / ||A||_F, ||V^T V - I||_F / sqrt(d)), in float64."""
    w, v = w.double(), v.double()
    residual = float(torch.linalg.matrix_norm(a @ v - v * w) / torch.linalg.matrix_norm(a))
    eye = torch.eye(v.shape[1], dtype=torch.float64, device=v.device)
    orth = float(torch.linalg.matrix_norm(v.T @ v - eye)) / math.sqrt(v.shape[1])
    return residual, orth


def bench_eigh(sizes: list[int], args, device: torch.device):
    """float64 eigenbases (for the edit) and float32-with-check ones when available, by size."""
    print(f"\neigh on {device} (sym_eigh; repeats {args.repeats} up to d=4096, 1 above); float32 path: "
          f"sym_eigh(precision='float32'), tolerance {spectrum.EIGH_RESIDUAL_TOL}")
    generator = torch.Generator(device=device).manual_seed(2)
    warm = random_psd(64, device, generator)
    sym_eigh(warm)
    torch.linalg.eigh(warm.float())
    sym_eigh(warm, precision="float32")
    bases64: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    bases32: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for d in sizes:
        repeats = args.repeats if d <= 4096 else 1
        a = random_psd(d, device, generator)
        (w64, v64), t64 = timed(device, repeats, sym_eigh, a)
        r64, o64 = eig_errors(a, w64, v64)
        bases64[d] = (w64, v64)
        lines = [f"  d={d:5d} float64              : {t64:7.3f} s  residual {r64:.1e}  orthogonality {o64:.1e}"]
        a32 = a.float()
        (w_raw, v_raw), t_raw = timed(device, repeats, torch.linalg.eigh, a32)
        r_raw, o_raw = eig_errors(a, w_raw, v_raw)
        del w_raw, v_raw, a32
        lines.append(f"          raw float32 eigh     : {t_raw:7.3f} s  residual {r_raw:.1e}  orthogonality {o_raw:.1e}"
                     f"  ({t64 / t_raw:.1f}x faster than float64; no symmetrise/sort/check)")
        (w32, v32), t32 = timed(device, repeats, sym_eigh, a, precision="float32")
        r32, o32 = eig_errors(a, w32, v32)
        eig_gap = float((w32.double() - w64).abs().max() / w64[0])
        fell_back = " (looks like the float64 fallback)" if r32 < 1e-12 else ""
        lines.append(f"          float32 + check      : {t32:7.3f} s  residual {r32:.1e}  orthogonality {o32:.1e}"
                     f"  max |w32 - w64| / w_max {eig_gap:.1e}; {t64 / t32:.1f}x faster{fell_back}")
        bases32[d] = (w32, v32)
        print("\n".join(lines), flush=True)
        del a
        release(device)
    return bases64, bases32


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(x.double() - ref) / torch.linalg.matrix_norm(ref).clamp(min=1e-300))


def cast_basis(lam, u_g, mu, u_a, dtype: torch.dtype) -> Eigenbasis:
    return Eigenbasis(lam=lam.to(dtype), U_G=u_g.to(dtype), mu=mu.to(dtype), U_A=u_a.to(dtype))


def bench_edit(shapes, bases64, bases32, args, device: torch.device) -> None:
    print(f"\nedit on {device}: cast of the float64 basis to the compute dtype, selection (select_by_mass, "
          f"rho {RHO}), basis change + mask (change_basis_and_mask)")
    generator = torch.Generator(device=device).manual_seed(3)
    for d_out, d_in in shapes:
        weight = (torch.randn(d_out, d_in, generator=generator, device=device) * 0.02).to(torch.bfloat16)
        w64 = weight.double()
        lam, u_g = bases64[d_out]
        mu, u_a = bases64[d_in]
        ref = ref_mask = None
        for dtype in (torch.float64, torch.float32):
            basis, t_cast = timed(device, args.repeats, cast_basis, lam, u_g, mu, u_a, dtype)
            select_by_mass(basis.lam, basis.mu, RHO)  # warm-up
            mask, t_select = timed(device, args.repeats, select_by_mass, basis.lam, basis.mu, RHO)
            change_basis_and_mask(weight, basis, mask)  # warm-up
            edited, t_change = timed(device, args.repeats, change_basis_and_mask, weight, basis, mask)
            if ref is None:
                ref, ref_mask = edited.double(), mask
                kept = int(mask.sum())
                identity = change_basis_and_mask(weight, basis, torch.ones_like(mask))
                print(f"  {d_out} x {d_in}: kept {kept} of {mask.numel()} components ({kept / mask.numel():.1%}), "
                      f"mass kept {mass_fraction(lam, mu, mask):.3f}, ||W' - W|| / ||W|| {rel(ref, w64):.3f}")
                accuracy = (f"rho=1 round trip error {rel(identity, w64):.1e}; "
                            f"bf16 round-off of W' {rel(ref.to(torch.bfloat16), ref):.1e}")
                del identity
            else:
                accuracy = (f"||W'32 - W'64|| / ||W'64|| {rel(edited, ref):.1e}; "
                            f"mask entries differing from float64: {int((mask != ref_mask).sum())}")
            name = str(dtype).replace("torch.", "")
            print(f"    {name:8s}: cast {t_cast:6.3f} s, select {t_select:6.3f} s, basis change {t_change:6.3f} s, "
                  f"total {t_cast + t_select + t_change:6.3f} s; {accuracy}")
            del basis, mask, edited
        if d_out in bases32 and d_in in bases32:
            (lam32, u_g32), (mu32, u_a32) = bases32[d_out], bases32[d_in]
            basis = Eigenbasis(lam=lam32.float(), U_G=u_g32.float(), mu=mu32.float(), U_A=u_a32.float())
            mask = select_by_mass(basis.lam, basis.mu, RHO)
            edited = change_basis_and_mask(weight, basis, mask)
            print(f"    float32 end to end (float32+check eigh, float32 basis change) vs all float64: "
                  f"||W'32 - W'64|| / ||W'64|| {rel(edited, ref):.1e}, mask entries differing "
                  f"{int((mask != ref_mask).sum())} (near-equal products at the cut can swap)")
            del basis, mask, edited
        del weight, w64, ref, ref_mask
        release(device)


# ---------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--arch", choices=("olmo2", "llama"), default="olmo2")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="model dtype")
    parser.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager, ...)")
    parser.add_argument("--tiny", action="store_true", help="tiny model and shapes (CPU smoke test)")
    parser.add_argument("--quick", action="store_true", help="fewer batches and one repeat")
    parser.add_argument("--parts", default="collect,linalg", help="comma list of: collect, linalg (eigh + edit)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 (tiny: 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 1024 (tiny: 32)")
    parser.add_argument("--batches", type=int, default=None, help="default 8, --quick 4 (tiny: 3)")
    parser.add_argument("--repeats", type=int, default=None, help="default 2, --quick 1")
    parser.add_argument("--few-blocks", type=int, default=4, help="the 'few blocks' collection tracks the last N")
    args = parser.parse_args()
    args.batch_size = args.batch_size or (2 if args.tiny else 8)
    args.seq_len = args.seq_len or (32 if args.tiny else 1024)
    args.batches = args.batches or (3 if args.tiny else 4 if args.quick else 8)
    args.repeats = args.repeats or (1 if args.quick else 2)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"collect", "linalg"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}")

    watch = Stopwatch()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("CUDA is not available; use --device cpu --tiny for a smoke test")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        props = torch.cuda.get_device_properties(device)
        where = (f"{torch.cuda.get_device_name(device)} ({props.total_memory / GIB:.0f} GiB), "
                 f"CUDA {torch.version.cuda}, "
                 f"linalg library {torch.backends.cuda.preferred_linalg_library()}")
    else:
        where = f"{device}, {torch.get_num_threads()} threads"
        if not args.tiny:
            print("warning: full-size shapes on a CPU take far longer than 8 minutes; use --tiny")
    transformers.logging.set_verbosity_error()
    print(f"device: {where}; torch {torch.__version__}, transformers {transformers.__version__}")
    dtype = getattr(torch, args.dtype)

    if "collect" in parts:
        model = build_model(args, device, dtype)
        params = sum(p.numel() for p in model.parameters())
        c = model.config
        print(f"model: random {type(model).__name__} ({args.dtype}, attn {c._attn_implementation}): "
              f"{params:,} parameters ({params / 1e9:.2f}B); hidden {c.hidden_size}, MLP {c.intermediate_size}, "
              f"{c.num_hidden_layers} blocks, {c.num_attention_heads} heads, vocab {c.vocab_size}")
        watch.part("build model")
        bench_collect(model, args, device, watch)
        del model
        release(device)

    if "linalg" in parts:
        shapes = EDIT_SHAPES["tiny" if args.tiny else "full"]
        sizes = [d for shape in shapes for d in shape]
        bases64, bases32 = bench_eigh(sizes, args, device)
        watch.part("eigh")
        bench_edit(shapes, bases64, bases32, args, device)
        watch.part("edit")

    total = time.perf_counter() - watch.start
    print(f"\ntotal runtime: {total:.1f} s ({total / 60:.1f} min; budget 8 min on one H100)")


if __name__ == "__main__":
    main()
