"""Sharded find-memorized and evaluate: two gloo processes launched the way torchrun launches
them (RANK / WORLD_SIZE / MASTER_* in the environment) write what one process writes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from typer.testing import CliRunner

from curvedit.cli import app
from curvedit.distributed import DistributedError, map_batches
from tests.reciter import HELDOUT, MEMORIZED, PREFIX, SUFFIX, write_workspace


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_args(root: Path, out: Path) -> list[str]:
    return ["find-memorized", "--model", root / "model", "--data", root / "corpus.jsonl", "--prefix", PREFIX,
            "--suffix", SUFFIX, "--batch-size", 3, "--keep-all", "--out", out]


def evaluate_args(root: Path, mem: Path, out: Path) -> list[str]:
    return ["evaluate", "--model", root / "model", "--reference", root / "model", "--memorized", mem,
            "--heldout", root / "heldout.jsonl", "--heldout-seq-len", 12, "--tasks", root / "tasks",
            "--left-extend", "4", "--right-shift", "3", "--batch-size", 3, "--name", "run", "--out", out]


def invoke(args) -> None:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def _rank_worker(rank: int, world: int, port: int, map_port: int, root: str) -> None:
    """One torchrun-style rank: the two commands, then `map_batches` checks."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    root = Path(root)
    invoke(find_args(root, root / "sharded.mem.jsonl"))
    invoke(evaluate_args(root, root / "single.mem.jsonl", root / "sharded.json"))
    assert not dist.is_initialized()  # each command tears its process group down
    os.environ["MASTER_PORT"] = str(map_port)  # a fresh store: the commands' one may still be closing
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        seen = []
        squares = map_batches(list(range(7)), 2, lambda chunk: seen.append(chunk) or [x * x for x in chunk])
        outcome = {"squares": squares, "mine": seen}

        def fail_on_rank_1(chunk):
            if rank == 1:
                raise ValueError("bad item")
            return chunk
        try:
            map_batches(list(range(4)), 1, fail_on_rank_1)
        except (ValueError, DistributedError) as err:
            outcome["error"] = f"{type(err).__name__}: {err}"
        (root / f"map_rank{rank}.json").write_text(json.dumps(outcome))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = write_workspace(tmp_path_factory.mktemp("sharded"))
    (root / "tasks" / "pick.jsonl").write_text("".join(
        json.dumps({"type": "choice", "prompt": t[:PREFIX], "choices": [t[PREFIX:], u[PREFIX:]], "answer": 0}) + "\n"
        for t, u in zip(MEMORIZED + HELDOUT, HELDOUT + MEMORIZED)))
    return root


def test_two_ranks_write_the_single_process_files_and_share_the_batches(workspace, monkeypatch):
    root = workspace
    invoke(find_args(root, root / "single.mem.jsonl"))
    invoke(evaluate_args(root, root / "single.mem.jsonl", root / "single.json"))

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    ports = free_port(), free_port()
    while ports[1] == ports[0]:
        ports = ports[0], free_port()
    mp.start_processes(_rank_worker, args=(2, *ports, str(root)), nprocs=2, join=True, start_method="fork")

    single_rows = (root / "single.mem.jsonl").read_text().splitlines()
    assert len(single_rows) == 8 and sum(json.loads(r)["memorized"] for r in single_rows) == 4
    assert (root / "sharded.mem.jsonl").read_text().splitlines() == single_rows
    single, sharded = (json.loads((root / f"{n}.json").read_text()) for n in ("single", "sharded"))
    assert sharded["metrics"] == single["metrics"]
    assert {"recitation", "perplexity", "ndcg", "tasks", "stress"} <= set(single["metrics"])
    assert (root / "sharded.details.jsonl").read_text() == (root / "single.details.jsonl").read_text()

    ranks = [json.loads((root / f"map_rank{r}.json").read_text()) for r in (0, 1)]
    for outcome in ranks:
        assert outcome["squares"] == [x * x for x in range(7)]  # every rank gets everything, in order
    assert ranks[0]["mine"] == [[0, 1], [4, 5]] and ranks[1]["mine"] == [[2, 3], [6]]  # batch c on rank c % 2
    assert ranks[1]["error"] == "ValueError: bad item"  # the failing rank raises its own error
    assert ranks[0]["error"] == "DistributedError: rank 1 failed: ValueError: bad item"  # the other one is told


@pytest.mark.slow  # two fresh interpreters importing torch + transformers: ~15 s on 2 shared cores
@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="no torchrun")
def test_torchrun_find_memorized_and_evaluate_write_the_single_process_files(workspace, tmp_path):
    root = workspace
    invoke(find_args(root, tmp_path / "one.mem.jsonl"))
    invoke(evaluate_args(root, tmp_path / "one.mem.jsonl", tmp_path / "one.json"))
    bindir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    for args in (find_args(root, tmp_path / "two.mem.jsonl"),
                 evaluate_args(root, tmp_path / "one.mem.jsonl", tmp_path / "two.json")):
        cmd = [str(bindir / "torchrun"), "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), str(bindir / "curvedit"), *map(str, args)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "two.mem.jsonl").read_text() == (tmp_path / "one.mem.jsonl").read_text()
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["metrics"] == one["metrics"]
