"""Scale: data-parallel collection (2 gloo processes on 127.0.0.1) and layer-group passes,
each against one plain single-process run on the same data."""

import copy
import os
import shutil
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor
from typer.testing import CliRunner

from curvedit.cli import app
from curvedit.data import pad_batch
from curvedit.distributed import DistContext, DistributedError, shard_model
from curvedit.kfac.collect import CollectError, CollectOptions, collect_factors, layer_groups, read_checkpoint_meta
from curvedit.kfac.factors import load_factors, model_identity
from curvedit.kfac.targets import TargetSpec, select_targets
from tests.helpers import Interrupt, interrupted
from tests.tiny_models import tiny_gpt2, tiny_olmo2

# 7 batches of 2: rank 0 owns 4 batches, rank 1 owns 3.
SEQS = [[1, 2, 3, 4, 5], [3, 4, 5, 6, 7, 8, 9], [2, 2, 7], [5, 1, 4], [9, 8, 7, 6], [1, 1, 2, 3], [4, 4, 4, 1],
        [6, 5], [7, 3, 2, 8, 1], [2, 9, 9], [3, 1, 4, 1, 5], [8, 8, 2], [5, 6, 7, 8], [10, 3, 3]]


def make_batches():
    return [pad_batch(SEQS[i:i + 2], 0) for i in range(0, len(SEQS), 2)]


def opts(**kw):
    return CollectOptions(progress=False, **kw)


def run(model, batches, **kw):
    return collect_factors(model, batches, select_targets(model, TargetSpec(preset="mlp")), options=opts(**kw))


def as_tensors(factors):
    return {name: (tf.A, tf.G, tf.positions) for name, tf in factors.targets.items()}


def assert_same(got, want, rtol, atol):
    assert list(got) == list(want)
    for name, (a_ii, g_oo, n) in want.items():
        assert got[name][2] == n, name
        torch.testing.assert_close(got[name][0], a_ii, rtol=rtol, atol=atol)
        torch.testing.assert_close(got[name][1], g_oo, rtol=rtol, atol=atol)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Sharding


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_are_disjoint_and_cover_the_data(world):
    owners = [[r for r in range(world) if DistContext(rank=r, world_size=world).owns(i)] for i in range(10)]
    assert all(len(o) == 1 for o in owners)  # every batch has exactly one rank
    assert [o[0] for o in owners] == [i % world for i in range(10)]  # batch i on rank i % world


# ---------------------------------------------------------------------------------------------
# Two gloo processes == one process


def _worker(rank: int, world: int, port: int, root: str) -> None:
    torch.set_num_threads(1)
    root = Path(root)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))  # a collective out of step fails, never hangs
    try:
        model = tiny_gpt2()
        results = {
            "gold64": run(model, make_batches(), label_mode="gold", accumulate_dtype="float64",
                          checkpoint_dir=root / f"ckpt_rank{rank}", checkpoint_every=3),
            "sampled32": run(model, make_batches(), seed=5),
            "passes": run(model, make_batches, seed=7, accumulate_dtype="float64", layers_per_pass=1),
            "resume": run(model, make_batches(), seed=7, accumulate_dtype="float64", checkpoint_dir=root / "shared",
                          checkpoint_every=2, resume=True),
        }
        sharded_model = shard_model(copy.deepcopy(model), "cpu")  # FSDP2: each rank keeps half the weights
        assert isinstance(sharded_model.transformer.h[0].mlp.c_fc.weight, DTensor)
        results["fsdp"] = run(sharded_model, make_batches(), label_mode="gold", accumulate_dtype="float64")
        # resumed in the middle of a round (batch 3 of 7), checkpointing on the way
        results["fsdp_resume"] = run(sharded_model, make_batches(), seed=7, accumulate_dtype="float64",
                                     checkpoint_dir=root / "shared3", checkpoint_every=3, resume=True)
        try:
            run(sharded_model, make_batches()[: 6 if rank == 1 else 7], label_mode="gold")
        except DistributedError as err:
            fsdp_mismatch = str(err)
        out = {name: as_tensors(f) for name, f in results.items()}
        out["fsdp_mismatch"] = fsdp_mismatch
        out["meta"] = results["sampled32"].collection
        out["fsdp_model"] = results["fsdp"].model
        uneven = make_batches()[: 6 if rank == 1 else 7]  # rank 1 reads one batch fewer
        try:
            run(model, uneven, label_mode="gold")
        except DistributedError as err:
            out["mismatch"] = str(err)
        torch.save(out, root / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_give_the_factors_of_one_process_and_only_rank_0_writes(tmp_path, monkeypatch):
    model = tiny_gpt2()
    targets = select_targets(model, TargetSpec(preset="mlp"))
    # A single-process checkpoint at batch 4 that the 2-process run resumes (world size may change).
    with pytest.raises(Interrupt):
        collect_factors(model, interrupted(make_batches(), after=5), targets,
                        options=opts(seed=7, accumulate_dtype="float64", checkpoint_dir=tmp_path / "shared",
                                     checkpoint_every=2))
    assert read_checkpoint_meta(tmp_path / "shared" / "checkpoint.safetensors")["batches_done"] == 4
    with pytest.raises(Interrupt):
        collect_factors(model, interrupted(make_batches(), after=4), targets,
                        options=opts(seed=7, accumulate_dtype="float64", checkpoint_dir=tmp_path / "shared3",
                                     checkpoint_every=3))
    assert read_checkpoint_meta(tmp_path / "shared3" / "checkpoint.safetensors")["batches_done"] == 3

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # gloo on the loopback interface only
    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")

    gold = as_tensors(run(model, make_batches(), label_mode="gold", accumulate_dtype="float64"))
    sampled32 = as_tensors(run(model, make_batches(), seed=5))
    sampled64 = as_tensors(run(model, make_batches(), seed=7, accumulate_dtype="float64"))
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert_same(got["gold64"], gold, rtol=1e-12, atol=1e-15)
        assert_same(got["sampled32"], sampled32, rtol=1e-5, atol=1e-7)
        assert_same(got["passes"], sampled64, rtol=1e-12, atol=1e-15)
        assert_same(got["resume"], sampled64, rtol=1e-12, atol=1e-15)
        assert_same(got["fsdp"], gold, rtol=1e-12, atol=1e-15)
        assert_same(got["fsdp_resume"], sampled64, rtol=1e-12, atol=1e-15)
        assert "one ran out of batches before another" in got["fsdp_mismatch"]
        assert got["fsdp_model"]["weights_hash"] == model_identity(model, targets)["weights_hash"]
        assert got["meta"]["world_size"] == 2 and got["meta"]["batches"] == 7
        assert got["meta"]["tokens"] == sum(len(s) for s in SEQS)
        assert "ranks disagree on the data: between 6 and 7 batches" in got["mismatch"]
    # Rank 0 alone writes checkpoints; they hold the totals over both ranks at batch 6.
    assert not (tmp_path / "ckpt_rank1").exists()
    meta = read_checkpoint_meta(tmp_path / "ckpt_rank0" / "checkpoint.safetensors")
    assert meta["batches_done"] == 6 and meta["world_size"] == 2
    assert meta["positions"][targets[0].name] == sum(len(s) - 1 for s in SEQS[:12])


# ---------------------------------------------------------------------------------------------
# Layer-group passes == one pass


def test_layer_groups_cut_blocks_in_module_order():
    model = tiny_gpt2(n_layer=3)
    targets = select_targets(model, TargetSpec(preset="mlp"))
    assert [[t.layer for t in g] for g in layer_groups(targets, 2)] == [[0, 0, 1, 1], [2, 2]]
    assert layer_groups(targets, None) == [targets] == layer_groups(targets, 3)
    with pytest.raises(CollectError, match="at least 1"):
        layer_groups(targets, 0)


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_olmo2], ids=["gpt2-conv1d", "olmo2-linear"])
@pytest.mark.parametrize("label_mode,dtype", [("gold", "float64"), ("sampled", "float64"), ("sampled", "float32")])
def test_layer_group_passes_equal_a_single_pass(make_model, label_mode, dtype):
    model = make_model()
    one = as_tensors(run(model, make_batches(), label_mode=label_mode, accumulate_dtype=dtype, seed=3))
    for source in (make_batches(), make_batches):  # a list, or a factory called once per pass
        passes = run(model, source, label_mode=label_mode, accumulate_dtype=dtype, seed=3, layers_per_pass=1)
        assert passes.collection["layers_per_pass"] == 1 and passes.collection["batches"] == 7
        for name, (a_ii, g_oo, n) in one.items():  # same ops on the same rows: bit for bit
            assert passes.targets[name].positions == n
            assert torch.equal(passes.targets[name].A, a_ii) and torch.equal(passes.targets[name].G, g_oo), name


def test_layer_group_passes_refuse_one_shot_iterators_and_changing_data(gpt2):
    targets = select_targets(gpt2, TargetSpec(preset="mlp"))
    with pytest.raises(CollectError, match="one-shot iterator"):
        collect_factors(gpt2, iter(make_batches()), targets, options=opts(layers_per_pass=1))
    calls = []

    def shrinking():
        calls.append(1)
        return make_batches()[: 8 - len(calls)]

    with pytest.raises(CollectError, match="pass 2 read 6 batches, the first pass 7"):
        collect_factors(gpt2, shrinking, targets, options=opts(layers_per_pass=1))


def test_resume_in_a_later_pass_gives_the_uninterrupted_factors(tmp_path, gpt2):
    targets = select_targets(gpt2, TargetSpec(preset="mlp"))
    settings = dict(seed=2, accumulate_dtype="float64", layers_per_pass=1, checkpoint_dir=tmp_path, checkpoint_every=2)
    whole = as_tensors(run(gpt2, make_batches(), seed=2, accumulate_dtype="float64"))
    calls = []

    def breaks_in_pass_2():
        calls.append(1)
        return make_batches() if len(calls) == 1 else interrupted(make_batches(), after=5)

    with pytest.raises(Interrupt):
        collect_factors(gpt2, breaks_in_pass_2, targets, options=opts(**settings))
    meta = read_checkpoint_meta(tmp_path / "checkpoint.safetensors")
    assert (meta["pass_index"], meta["batches_done"], meta["batches_per_pass"]) == (1, 4, 7)
    resumed = collect_factors(gpt2, make_batches, targets, options=opts(**settings, resume=True))
    assert_same(as_tensors(resumed), whole, rtol=1e-12, atol=1e-15)
    assert resumed.collection["tokens"] == sum(len(s) for s in SEQS)
    with pytest.raises(CollectError, match="another run .layers_per_pass: checkpoint 1, now None"):
        collect_factors(gpt2, make_batches, targets, options=opts(**{**settings, "layers_per_pass": None}, resume=True))


# ---------------------------------------------------------------------------------------------
# The CLI: --layers-per-pass, and torchrun


def cli_collect(lm_dir, data, out, *extra):
    return CliRunner().invoke(app, ["collect", "--model", str(lm_dir), "--data", str(data), "--out", str(out),
                                    "--labels", "gold", "--seq-len", "8", "--batch-size", "2", "--no-progress",
                                    *map(str, extra)])


def test_cli_layers_per_pass_gives_the_single_pass_factors(tmp_path, lm_dir, text_jsonl):
    assert cli_collect(lm_dir, text_jsonl, tmp_path / "one").exit_code == 0
    result = cli_collect(lm_dir, text_jsonl, tmp_path / "passes", "--layers-per-pass", 1, "--progress")  # the plan
    assert result.exit_code == 0, result.output
    assert "2 passes of <= 1 blocks" in result.output
    one, passes = load_factors(tmp_path / "one"), load_factors(tmp_path / "passes")
    for name, tf in one.targets.items():
        assert torch.equal(passes.targets[name].A, tf.A) and torch.equal(passes.targets[name].G, tf.G)


def test_fsdp_needs_several_processes(tmp_path, lm_dir, text_jsonl):
    result = cli_collect(lm_dir, text_jsonl, tmp_path / "out", "--fsdp")
    assert result.exit_code == 2 and "torchrun --nproc-per-node N" in result.output
    with pytest.raises(DistributedError, match="several processes"):
        shard_model(tiny_gpt2(), "cpu")


@pytest.mark.slow  # two fresh interpreters importing torch + transformers: ~15 s on 2 shared cores
@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="no torchrun")
@pytest.mark.parametrize("extra", [(), ("--fsdp",)], ids=["data-parallel", "fsdp"])
def test_torchrun_cli_with_two_processes_equals_one_process(tmp_path, lm_dir, text_jsonl, extra):
    assert cli_collect(lm_dir, text_jsonl, tmp_path / "one").exit_code == 0
    bindir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [str(bindir / "torchrun"), "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(bindir / "curvedit"), "collect", "--model", str(lm_dir),
           "--data", str(text_jsonl), "--out", str(tmp_path / "two"), "--labels", "gold", "--seq-len", "8",
           "--batch-size", "2", "--no-progress", *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote factors") == 1 and "2 processes" in done.stdout
    one, two = load_factors(tmp_path / "one"), load_factors(tmp_path / "two")
    assert two.collection["world_size"] == 2
    for name, tf in one.targets.items():
        assert two.targets[name].positions == tf.positions
        torch.testing.assert_close(two.targets[name].A, tf.A, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(two.targets[name].G, tf.G, rtol=1e-5, atol=1e-8)
