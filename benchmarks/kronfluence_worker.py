"""Helpers of `bench_reference.py`, and its kronfluence worker.

The helpers (model rebuild, sampled-label losses) need only torch and transformers, so
`bench_reference.py` imports them in the project's environment and this file runs them
again, as a script, in the separate kronfluence environment that `bench_reference.py`
creates (`benchmarks/.venv-kronfluence`; kronfluence is never a project dependency):

    benchmarks/.venv-kronfluence/bin/python benchmarks/kronfluence_worker.py SPEC.pt RESULT.pt

SPEC.pt (written by `bench_reference.py`) holds the GPT-2 config, its weights, the token
batches, the tracked module names, the sampler and the number of repeats. The worker
rebuilds the same model, converts GPT-2's `Conv1D` modules to `nn.Linear` (kronfluence
tracks only `nn.Linear`/`nn.Conv2d`; its own GPT-2 examples do the same conversion), and
times, alternating, best of the repeats:
- a plain forward+backward over the batches (sampled labels, summed loss, every parameter
  gradient), in this process, as the yardstick of this process;
- `Analyzer.fit_covariance_matrices` (covariance pass only: no eigendecomposition, no
  Lambda pass) on the same batches, same batch size, CPU, float32 covariances, sampled
  labels (`compute_train_loss(..., sample=True)`), tracking only the given modules.
  The time is kronfluence's own log of the pass ("Fitted covariance matrices ... in X
  seconds"): its data loop, without writing the factors to disk.
It saves the times and kronfluence's covariance sums (with their counts) to RESULT.pt.
"""

from __future__ import annotations

import logging
import re
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

SAMPLERS = ("cdf", "multinomial")


def batch_generator(seed: int, index: int) -> torch.Generator:
    """The label sampler of batch `index` (same seeding rule as curvedit's)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def sample_labels(logits_nv: torch.Tensor, generator: torch.Generator, sampler: str) -> torch.Tensor:
    """One label per row drawn from softmax(logits), without gradient.

    "cdf": one uniform per row and a binary search in the CDF (the sampler curvedit uses);
    "multinomial": `torch.multinomial` on the probabilities (kronfluence's examples).
    """
    with torch.no_grad():
        if sampler == "multinomial":
            probs = torch.softmax(logits_nv.float(), dim=-1)
            return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
        cdf = torch.log_softmax(logits_nv.float(), dim=-1).exp().cumsum(dim=-1)  # as curvedit computes it
        u = torch.rand(cdf.shape[0], 1, generator=generator, dtype=cdf.dtype) * cdf[:, -1:]
        return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1).squeeze(-1)


def shifted_sampled_loss(model: nn.Module, batch: dict, generator: torch.Generator, sampler: str) -> torch.Tensor:
    """Summed cross-entropy of positions 0..T-2 against labels sampled from the model."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    flat = logits[:, :-1, :].reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat.float(), sample_labels(flat, generator, sampler), reduction="sum")


def plain_forward_backward(model: nn.Module, batches: list[dict], sampler: str, seed: int = 0) -> None:
    """Forward + backward of the summed sampled-label loss; every parameter gets its gradient."""
    for index, batch in enumerate(batches):
        model.zero_grad(set_to_none=True)
        shifted_sampled_loss(model, batch, batch_generator(seed, index), sampler).backward()
    model.zero_grad(set_to_none=True)


def build_gpt2(config_dict: dict, state_dict: dict | None = None) -> nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config_dict))
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model.eval()


@torch.no_grad()
def conv1d_to_linear(model: nn.Module) -> None:
    """Replace every transformers `Conv1D` (weight `(d_in, d_out)`) by the same `nn.Linear`."""
    from transformers.pytorch_utils import Conv1D

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                d_in, d_out = child.weight.shape
                linear = nn.Linear(d_in, d_out, bias=child.bias is not None)
                linear.weight.copy_(child.weight.T)
                if child.bias is not None:
                    linear.bias.copy_(child.bias)
                setattr(parent, name, linear)


class _TimeLog(logging.Handler):
    """Collects kronfluence's own "Fitted covariance matrices with N data points in X seconds"."""

    PATTERN = re.compile(r"Fitted covariance matrices with (\d+) data points in ([0-9.]+) seconds")

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.found: list[tuple[int, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = self.PATTERN.search(record.getMessage())
        if match:
            self.found.append((int(match.group(1)), float(match.group(2))))


def run_worker(spec_path: str, result_path: str) -> None:
    torch.set_num_threads(1)
    import kronfluence
    import transformers
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task

    spec = torch.load(spec_path, weights_only=False)
    sampler, seed, repeats = spec["sampler"], spec["seed"], spec["repeats"]
    batches = spec["batches"]
    batch_size = batches[0]["input_ids"].shape[0]
    tracked = list(spec["tracked"])

    plain_model = build_gpt2(spec["config"], spec["state_dict"])
    conv1d_to_linear(plain_model)

    class CausalLMTask(Task):
        def __init__(self) -> None:
            self.calls = 0

        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            flat = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
            if sample:
                labels = sample_labels(flat, batch_generator(seed, self.calls % len(batches)), sampler)
            else:
                labels = batch["input_ids"][:, 1:].reshape(-1)
            self.calls += 1
            return F.cross_entropy(flat, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model, sample=False)

        def get_influence_tracked_modules(self):
            return tracked

        def get_attention_mask(self, batch):
            return batch["attention_mask"] if spec.get("mask") else None  # None: no padding, its cheapest path

    task = CausalLMTask()
    kron_model = build_gpt2(spec["config"], spec["state_dict"])
    conv1d_to_linear(kron_model)  # before prepare_model, which wraps only nn.Linear/nn.Conv2d
    kron_model = prepare_model(kron_model, task)
    dataset = [{k: v[i] for k, v in batch.items()} for batch in batches for i in range(batch_size)]

    handler = _TimeLog()
    logging.getLogger("kronfluence").addHandler(handler)
    factor_args = FactorArguments(strategy="kfac", use_empirical_fisher=False, covariance_max_examples=None,
                                  activation_covariance_dtype=torch.float32, gradient_covariance_dtype=torch.float32)
    with tempfile.TemporaryDirectory(prefix="kronfluence-bench-") as out_dir:
        analyzer = Analyzer(analysis_name="bench", model=kron_model, task=task, cpu=True, log_level=logging.INFO,
                            disable_tqdm=True, output_dir=out_dir, disable_model_save=True)
        for handle in list(logging.getLogger().handlers):  # keep kronfluence's INFO lines off the terminal
            logging.getLogger().removeHandler(handle)

        def fit(examples: list[dict]) -> float:
            task.calls = 0
            start = time.perf_counter()
            analyzer.fit_covariance_matrices(factors_name="bench", dataset=examples, per_device_batch_size=batch_size,
                                             factor_args=factor_args, overwrite_output_dir=True)
            return time.perf_counter() - start

        plain_forward_backward(plain_model, batches[:1], sampler, seed)  # warm up both paths
        fit(dataset[:batch_size])
        plain_times, call_times = [], []
        handler.found.clear()
        for _ in range(repeats):
            start = time.perf_counter()
            plain_forward_backward(plain_model, batches, sampler, seed)
            plain_times.append(time.perf_counter() - start)
            call_times.append(fit(dataset))
        factors = analyzer.load_covariance_matrices(factors_name="bench")
    if len(handler.found) != repeats:
        raise RuntimeError(f"expected {repeats} covariance timings in kronfluence's log, found {handler.found}")
    summary = {name: {"A": factors["activation_covariance"][name], "G": factors["gradient_covariance"][name],
                      "n_a": int(factors["num_activation_covariance_processed"][name].item()),
                      "n_g": int(factors["num_gradient_covariance_processed"][name].item())} for name in tracked}
    torch.save({
        "kronfluence": kronfluence.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": torch.get_num_threads(), "examples": handler.found[-1][0],
        "plain_s": plain_times, "covariance_s": [t for _, t in handler.found], "call_s": call_times,
        "factors": summary,
    }, result_path)


if __name__ == "__main__":
    run_worker(sys.argv[1], sys.argv[2])
