"""The memory plan: exact accumulator sizes, the fit check, its suggestions, the CLI refusal."""

import pytest
import torch
from typer.testing import CliRunner

from curvedit.cli import app
from curvedit.kfac.memory import HEADROOM, MemoryPlan, plan_memory, tokens_per_example
from curvedit.kfac.targets import TargetSpec, select_targets
from tests.tiny_models import tiny_gpt2, tiny_olmo2, tiny_vit

GIB = 2 ** 30


def olmo(dtype=torch.float64):
    model = tiny_olmo2(dtype=dtype)
    return model, select_targets(model, TargetSpec(preset="mlp"))


def acc_bytes(targets, size):
    return sum((t.shape_oi[0] ** 2 + t.shape_oi[1] ** 2) * size for t in targets)


def test_a_tiny_run_fits_and_the_table_shows_every_part():
    model, targets = olmo()
    plan = plan_memory(model, targets, 4, 16, "float32", None, "cpu")
    assert plan.fits and plan.suggestion == "" and plan.passes == 1
    assert plan.available_bytes is not None and plan.available_bytes > 0  # measured: RAM available here
    weights = (sum(p.numel() * 8 for p in model.parameters())
               + sum(b.numel() * b.element_size() for b in model.buffers()))
    assert plan.weights_bytes == plan.resident_bytes == weights  # already on the CPU
    assert plan.accumulators_bytes == acc_bytes(targets, 4) and plan.host_bytes == 0
    assert plan.eigh_bytes == 5 * 8 * 24 ** 2
    table = plan.table()
    for row in ("weights", "activations (rough)", "accumulators", "peak", "free", "-> fits", "eigh later"):
        assert row in table


def test_accumulators_follow_the_dtype_and_the_pass_groups():
    model, targets = olmo()
    cpu = plan_memory(model, targets, 1, 8, "float64", 1, "cpu", available_bytes=GIB)
    assert cpu.passes == 2 and cpu.accumulators_bytes == acc_bytes(targets, 8)  # all stay in RAM on CPU
    cuda = plan_memory(model, targets, 1, 8, "float64", 1, "cuda", available_bytes=GIB, host_available_bytes=GIB)
    per_layer = acc_bytes([t for t in targets if t.layer == 0], 8)
    assert cuda.accumulators_bytes == per_layer and cuda.host_bytes == acc_bytes(targets, 8)
    assert cuda.resident_bytes == 0  # the model is on the CPU: its weights still have to move


def test_activations_grow_with_batch_and_sequence_and_vit_counts_patches():
    model, targets = olmo()
    act = lambda b, t: plan_memory(model, targets, b, t, "float32", None, "cpu").activations_bytes  # noqa: E731
    assert act(8, 16) == pytest.approx(2 * act(4, 16), rel=0.01)
    assert act(4, 32) > 2 * act(4, 16)  # attention probabilities grow with T^2
    vit = tiny_vit()
    assert tokens_per_example(vit, 512) == 5 and tokens_per_example(model, 512) == 512
    assert plan_memory(vit, select_targets(vit, TargetSpec(preset="mlp")), 2, 512, "float32", None, "cpu").seq_len == 5


def test_an_impossible_batch_is_refused_with_a_batch_size_that_fits():
    model, targets = olmo()
    plan = plan_memory(model, targets, 10 ** 9, 16, "float32", None, "cpu", available_bytes=GIB)
    assert not plan.fits and "does NOT fit" in plan.table()
    assert plan.suggestion.startswith("try --batch-size ")
    batch = int(plan.suggestion.split()[-1])
    assert plan_memory(model, targets, batch, 16, "float32", None, "cpu", available_bytes=GIB).fits
    assert not plan_memory(model, targets, batch + 1, 16, "float32", None, "cpu", available_bytes=GIB).fits


def test_too_many_accumulators_on_a_gpu_suggest_fewer_layers_per_pass():
    model, targets = olmo()
    need = lambda k: plan_memory(model, targets, 1, 4, "float64", k, "cuda", available_bytes=GIB,  # noqa: E731
                                 host_available_bytes=GIB).needed_bytes
    between = int((need(1) + need(None)) / 2 / 0.9)
    plan = plan_memory(model, targets, 1, 4, "float64", None, "cuda", available_bytes=between, host_available_bytes=GIB)
    assert not plan.fits and plan.suggestion == "try --layers-per-pass 1"
    assert plan_memory(model, targets, 1, 4, "float64", 1, "cuda", available_bytes=between,
                       host_available_bytes=GIB).fits


def test_weights_that_cannot_fit_on_a_gpu_suggest_fsdp():
    model, targets = olmo()
    plan = plan_memory(model, targets, 1, 4, "float32", 1, "cuda", available_bytes=1000, host_available_bytes=GIB)
    assert not plan.fits
    assert "--fsdp" in plan.suggestion and "--model-dtype" in plan.suggestion


def test_fsdp_keeps_a_shard_of_the_weights_the_root_and_two_blocks():
    model, targets = olmo()
    whole = plan_memory(model, targets, 1, 4, "float32", None, "cpu")
    sharded = plan_memory(model, targets, 1, 4, "float32", None, "cpu", weight_shards=4)
    block = sum(p.numel() * 8 for p in model.model.layers[0].parameters())
    root = whole.weights_bytes - 2 * block  # embeddings, final norm, head (and buffers)
    assert sharded.weights_bytes == -(-whole.weights_bytes // 4) + root + 2 * block
    assert sharded.activations_bytes == whole.activations_bytes
    assert "1/4 + root + 2 blocks (FSDP)" in sharded.table()


def test_processes_sharing_host_memory_multiply_what_is_needed():
    model, targets = olmo()
    one = plan_memory(model, targets, 4, 16, "float32", None, "cpu", available_bytes=GIB)
    two = plan_memory(model, targets, 4, 16, "float32", None, "cpu", available_bytes=GIB, ranks_sharing_memory=2)
    assert two.needed_bytes == 2 * one.needed_bytes


def test_unknown_free_memory_is_not_checked():
    model, targets = olmo()
    plan = MemoryPlan(**{**plan_memory(model, targets, 1, 4, "float32", None, "cpu").__dict__, "available_bytes": None})
    assert plan.fits and "not checked" in plan.table()


def test_bad_arguments_are_refused():
    model, targets = olmo()
    with pytest.raises(ValueError, match="accumulate_dtype"):
        plan_memory(model, targets, 1, 4, "float16", None, "cpu")
    with pytest.raises(ValueError, match="at least 1"):
        plan_memory(model, targets, 0, 4, "float32", None, "cpu")
    with pytest.raises(ValueError, match="no targets"):
        plan_memory(model, [], 1, 4, "float32", None, "cpu")


def test_a_model_without_config_is_planned_from_its_targets():
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Linear(32, 8))
    targets = select_targets(model, TargetSpec(patterns=("*",)))
    plan = plan_memory(model, targets, 2, 3, "float32", None, "cpu")
    assert plan.fits and plan.accumulators_bytes == acc_bytes(targets, 4) and plan.activations_bytes > 0


def test_cli_prints_the_plan_and_refuses_a_run_that_will_not_fit(tmp_path, lm_dir, text_jsonl):
    args = ["collect", "--model", str(lm_dir), "--data", str(text_jsonl), "--seq-len", "16", "--no-progress",
            "--batch-size", str(10 ** 9)]
    refused = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert refused.exit_code == 2
    assert "memory plan on cpu" in refused.output and "will not fit" in refused.output
    assert "try --batch-size" in refused.output and "--no-memory-check" in refused.output
    assert not (tmp_path / "a").exists()
    forced = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b"), "--no-memory-check"])
    assert forced.exit_code == 0, forced.output
    assert "does NOT fit" in forced.output and (tmp_path / "b" / "factors.json").exists()


def test_gpt2_conv1d_targets_are_planned_as_d_out_by_d_in():
    model = tiny_gpt2()
    targets = select_targets(model, TargetSpec(preset="mlp-in"))
    plan = plan_memory(model, targets, 1, 4, "float32", None, "cpu")
    assert plan.accumulators_bytes == 2 * (16 ** 2 + 64 ** 2) * 4


def test_gradient_checkpointing_shrinks_activations_and_is_suggested_when_it_is_enough():
    model, targets = olmo()
    plan = lambda ckpt, free=None: plan_memory(model, targets, 8, 16, "float32", None, "cpu",  # noqa: E731
                                               available_bytes=free, gradient_checkpointing=ckpt)
    full, recomputed = plan(False), plan(True)
    assert recomputed.activations_bytes < full.activations_bytes
    just_enough = int(recomputed.needed_bytes / HEADROOM) + 1  # fits only with checkpointing
    refused = plan(False, just_enough)
    assert not refused.fits and "--gradient-checkpointing" in refused.suggestion
    assert plan(True, just_enough).fits
