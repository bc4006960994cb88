"""K-FAC collection against references computed another way, in float64.

The reference runs each sequence alone (no batching, no padding), keeps the target outputs
with `retain_grad`, calls `.backward()` on the summed gold-label loss and forms the mean of
per-position outer products by brute force.
"""

import pytest
import torch
import torch.nn.functional as F

from curvedit.data import pad_batch
from curvedit.kfac.collect import CollectError, CollectOptions, collect_factors
from curvedit.kfac.objectives import CustomObjective, ImageClassificationObjective
from curvedit.kfac.targets import TargetSpec, select_targets
from tests.helpers import target_io
from tests.tiny_models import tiny_gpt2, tiny_olmo2, tiny_vit

SEQS = [[1, 2, 3, 4, 5], [3, 4, 5, 6, 7, 8, 9], [2, 2], [5, 1, 4]]


def gold(**kw):
    return CollectOptions(label_mode="gold", accumulate_dtype="float64", progress=False, **kw)


def brute_force_lm(model, targets, seqs):
    """Mean over counted positions of x x^T and g g^T, one sequence at a time, gold labels."""
    sums = {t.name: [0, 0] for t in targets}
    count = 0
    for seq in seqs:
        ids = torch.tensor([seq])
        io = target_io(model, targets, ids, lambda logits, ids=ids: F.cross_entropy(logits[:-1], ids[0, 1:],
                                                                               reduction="sum"))
        n = len(seq) - 1
        count += n
        for name, (x, g) in io.items():
            sums[name][0] = sums[name][0] + sum(torch.outer(v, v) for v in x[:n])
            sums[name][1] = sums[name][1] + sum(torch.outer(v, v) for v in g[:n])
    return {name: (a / count, g / count) for name, (a, g) in sums.items()}, count


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_olmo2], ids=["gpt2-conv1d", "olmo2-linear"])
@pytest.mark.parametrize("batch_size,side", [(1, "right"), (2, "right"), (4, "left"), (3, "left")])
def test_lm_factors_equal_brute_force_per_sequence_reference(make_model, batch_size, side):
    model = make_model()
    targets = select_targets(model, TargetSpec(preset="mlp"))
    batches = [pad_batch(SEQS[i:i + batch_size], 0, side) for i in range(0, len(SEQS), batch_size)]
    factors = collect_factors(model, batches, targets, options=gold())
    ref_model = make_model()
    reference, count = brute_force_lm(ref_model, select_targets(ref_model, TargetSpec(preset="mlp")), SEQS)
    for name, (a_ref, g_ref) in reference.items():
        tf = factors.targets[name]
        assert tf.positions == count == sum(len(s) - 1 for s in SEQS)
        torch.testing.assert_close(tf.A, a_ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(tf.G, g_ref, rtol=1e-9, atol=1e-14)


def brute_force_vit(model, targets, pixels, labels, positions):
    sums = {t.name: [0, 0] for t in targets}
    for img, label in zip(pixels, labels):
        store = {}
        hooks = [t.module.register_forward_hook(lambda m, i, o, n=t.name, store=store: store.__setitem__(n, (i[0], o)))
                 for t in targets]
        for t in targets:
            t.module.weight.requires_grad_(True)
        logits = model(pixel_values=img[None]).logits
        for _, out in store.values():
            out.retain_grad()
        F.cross_entropy(logits, label[None], reduction="sum").backward()
        for h in hooks:
            h.remove()
        for name, (x, out) in store.items():
            rows = range(x.shape[1]) if positions == "all" else [0]
            sums[name][0] = sums[name][0] + sum(torch.outer(x[0, r], x[0, r]) for r in rows)
            sums[name][1] = sums[name][1] + sum(torch.outer(out.grad[0, r], out.grad[0, r]) for r in rows)
    n = len(pixels) * (5 if positions == "all" else 1)
    return {name: (a / n, g / n) for name, (a, g) in sums.items()}, n


@pytest.mark.parametrize("positions", ["cls", "all"])
def test_vit_factors_equal_brute_force_reference(positions):
    torch.manual_seed(1)
    pixels = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    labels = torch.randint(0, 5, (6,))
    model = tiny_vit()
    targets = select_targets(model, TargetSpec(preset="mlp"))
    batches = [{"pixel_values": pixels[i:i + 4], "labels": labels[i:i + 4]} for i in (0, 4)]
    factors = collect_factors(model, batches, targets, ImageClassificationObjective("gold", positions), gold())
    ref_model = tiny_vit()
    ref_targets = select_targets(ref_model, TargetSpec(preset="mlp"))
    reference, n = brute_force_vit(ref_model, ref_targets, pixels, labels, positions)
    for name, (a_ref, g_ref) in reference.items():
        assert factors.targets[name].positions == n
        torch.testing.assert_close(factors.targets[name].A, a_ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(factors.targets[name].G, g_ref, rtol=1e-9, atol=1e-14)


def exact_true_fisher_g(model, target, seqs):
    """E over labels sampled from the model of g g^T, exactly: sum_s sum_y p_s(y) j_sy j_sy^T.

    Labels at different positions are independent given the (fixed) inputs and each has
    zero-mean score, so the cross terms of g = sum_s j_s vanish.
    """
    total, count = 0, 0
    for seq in seqs:
        store = {}
        hook = target.module.register_forward_hook(lambda m, i, o, store=store: store.__setitem__("out", o))
        target.module.weight.requires_grad_(True)
        logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0], -1)
        hook.remove()
        n = len(seq) - 1
        count += n
        for s in range(n):
            for y in range(logp.shape[-1]):
                (j,) = torch.autograd.grad(-logp[s, y], store["out"], retain_graph=True)
                j = j[0, :n]
                total = total + logp[s, y].exp() * j.T @ j
    return total / count


def test_sampled_labels_converge_to_the_exact_true_fisher_and_gold_labels_do_not():
    model = tiny_gpt2(vocab=5)
    target = select_targets(model, TargetSpec(patterns=("transformer.h.1.mlp.c_fc",)))[0]
    seqs = [[1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 2, 2]]
    exact = exact_true_fisher_g(model, target, seqs)
    repeats = [pad_batch(seqs, 0)] * 400
    sampled = collect_factors(model, repeats, [target], options=CollectOptions(
        accumulate_dtype="float64", progress=False, seed=3)).targets[target.name].G
    gold_g = collect_factors(model, repeats[:1], [target], options=gold()).targets[target.name].G
    rel = lambda m: float(torch.linalg.norm(m - exact.detach()) / torch.linalg.norm(exact.detach()))  # noqa: E731
    assert rel(sampled) < 0.05
    assert rel(gold_g) > 0.2


class OneLinear(torch.nn.Module):
    def __init__(self, d_in, classes):
        super().__init__()
        self.lin = torch.nn.Linear(d_in, classes, bias=False, dtype=torch.float64)

    def forward(self, x):
        return self.lin(x)


def one_layer_objective(label_mode):
    return CustomObjective(lambda model, batch: (model(batch["x"]), torch.ones(batch["x"].shape[0], dtype=torch.bool)),
                           label_mode)


def test_kfac_is_exact_for_one_linear_layer_and_one_repeated_input():
    torch.manual_seed(0)
    model = OneLinear(4, 3)
    target = select_targets(model, TargetSpec(patterns=("lin",)))[0]
    x = torch.randn(4, dtype=torch.float64)
    labels = torch.tensor([0, 2, 2, 1, 0, 2])
    batch = {"x": x.expand(6, 4).clone(), "labels": labels}
    tf = collect_factors(model, [batch], [target], one_layer_objective("gold"), gold()).targets["lin"]
    # Empirical Fisher of vec(W) (row-major), per example: vec(dL/dW) vec(dL/dW)^T.
    grads = []
    for y in labels:
        model.zero_grad()
        F.cross_entropy(model(x[None]), y[None]).backward()
        grads.append(model.lin.weight.grad.flatten().clone())
    fisher = sum(torch.outer(g, g) for g in grads) / len(grads)
    torch.testing.assert_close(torch.kron(tf.G, tf.A), fisher, rtol=1e-10, atol=1e-14)
    # True Fisher: sampled labels converge to sum_y p(y) vec(grad_y) vec(grad_y)^T.
    probs = torch.softmax(model(x), -1).detach()
    exact = 0
    for y in range(3):
        model.zero_grad()
        F.cross_entropy(model(x[None]), torch.tensor([y])).backward()
        exact = exact + probs[y] * torch.outer(model.lin.weight.grad.flatten(), model.lin.weight.grad.flatten())
    many = {"x": x.expand(20000, 4).clone()}
    tf = collect_factors(model, [many], [target], one_layer_objective("sampled"),
                         CollectOptions(accumulate_dtype="float64", progress=False)).targets["lin"]
    assert float(torch.linalg.norm(torch.kron(tf.G, tf.A) - exact) / torch.linalg.norm(exact)) < 0.03


def test_sampled_collection_is_repeatable_for_a_seed_and_differs_across_seeds():
    model = tiny_gpt2()
    targets = select_targets(model, TargetSpec(preset="mlp"))
    run = lambda seed: collect_factors(model, [pad_batch(SEQS, 0)], targets, options=CollectOptions(  # noqa: E731
        seed=seed, progress=False)).targets[targets[0].name].G
    torch.testing.assert_close(run(1), run(1), rtol=0, atol=0)
    assert not torch.allclose(run(1), run(2))


def test_no_parameter_gradient_is_left_and_flags_are_restored(gpt2):
    targets = select_targets(gpt2, TargetSpec(preset="mlp"))
    gpt2.transformer.wte.weight.requires_grad_(True)
    collect_factors(gpt2, [pad_batch(SEQS, 0)], targets, options=gold())
    assert all(p.grad is None for p in gpt2.parameters())
    assert all(p.requires_grad for p in gpt2.parameters())


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_olmo2])
def test_gradient_checkpointing_gives_the_same_factors_with_dropout_still_off(make_model):
    model = make_model()
    if hasattr(model.config, "resid_pdrop"):  # dropout that would change the factors if it were on
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.5
    targets = select_targets(model, TargetSpec(preset="mlp"))
    batches = [pad_batch(SEQS[:2], 0), pad_batch(SEQS[2:], 0)]
    plain = collect_factors(model, batches, targets, options=CollectOptions(seed=3, accumulate_dtype="float64",
                                                                            progress=False))
    recomputed = collect_factors(model, batches, targets, options=CollectOptions(
        seed=3, accumulate_dtype="float64", progress=False, gradient_checkpointing=True))
    for target in targets:
        ours, ref = recomputed.targets[target.name], plain.targets[target.name]
        assert ours.positions == ref.positions
        torch.testing.assert_close(ours.A, ref.A, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(ours.G, ref.G, rtol=1e-12, atol=1e-14)
    blocks = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    assert blocks and not any(m.training or m.gradient_checkpointing for m in blocks)


def test_gradient_checkpointing_needs_transformers_blocks():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    targets = select_targets(model, TargetSpec(patterns=("0",)))
    batch = {"x": torch.randn(5, 3)}
    objective = CustomObjective(lambda m, b: (m(b["x"]), torch.ones(5, dtype=torch.bool)))
    with pytest.raises(CollectError, match="GradientCheckpointingLayer"):
        collect_factors(model, [batch], targets, objective=objective,
                        options=CollectOptions(progress=False, gradient_checkpointing=True))


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
def test_a_low_precision_model_accumulates_in_float32_close_to_the_float64_reference(dtype, bound):
    """Measured on this model: relative error 2e-7 (float32) and 8e-3 (bfloat16)."""
    model = tiny_gpt2(dtype=dtype)
    low = collect_factors(model, [pad_batch(SEQS, 0)], select_targets(model, TargetSpec(preset="mlp")),
                          options=CollectOptions(label_mode="gold", progress=False)).targets
    model64 = tiny_gpt2()
    f64 = collect_factors(model64, [pad_batch(SEQS, 0)], select_targets(model64, TargetSpec(preset="mlp")),
                          options=gold()).targets
    for name in low:
        assert low[name].A.dtype == torch.float32 and low[name].G.dtype == torch.float32
        for ours, ref in ((low[name].A, f64[name].A), (low[name].G, f64[name].G)):
            assert float(torch.linalg.norm(ours.double() - ref) / torch.linalg.norm(ref)) < bound


def test_empty_data_is_an_error(gpt2):
    with pytest.raises(CollectError, match="no data"):
        collect_factors(gpt2, [], select_targets(gpt2, TargetSpec(preset="mlp")), options=gold())


def test_nan_loss_is_reported_not_accumulated(gpt2):
    with torch.no_grad():
        gpt2.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(CollectError, match="NaN"):
        collect_factors(gpt2, [pad_batch(SEQS, 0)], select_targets(gpt2, TargetSpec(preset="mlp")), options=gold())


class NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class NanGradModel(OneLinear):
    def forward(self, x):
        return NanGrad.apply(self.lin(x))


def test_nan_gradient_is_reported_with_the_target_name():
    model = NanGradModel(4, 3)
    target = select_targets(model, TargetSpec(patterns=("lin",)))[0]
    with pytest.raises(CollectError, match="non-finite output gradients at lin"):
        collect_factors(model, [{"x": torch.randn(5, 4, dtype=torch.float64)}], [target],
                        one_layer_objective("sampled"), CollectOptions(progress=False))


def test_inverse_cdf_sampler_draws_from_the_given_distribution():
    from curvedit.kfac.objectives import sample_categorical

    probs = torch.tensor([0.5, 0.0, 0.2, 0.3, 1e-9])
    logp = probs.log().expand(100_000, 5)
    draws = sample_categorical(logp, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).double() / draws.numel()
    torch.testing.assert_close(freq, probs.double(), atol=0.006, rtol=0)
    assert freq[1] == 0
