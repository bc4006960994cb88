"""Bad input through the real command line: one line `error: ...` on stderr, exit status 2,
no traceback, and nothing the user had is touched (no file created, changed or removed).

Commands run with `--no-progress`: progress bars (transformers' loading bar included) also go
to stderr. Each row names the bad input and builds the arguments in a shared workspace (a tiny GPT-2
with a character tokenizer, a corpus, factors collected from it, memorized windows). The
workspace is built once; every row checks that the whole workspace is byte-for-byte what it
was before the command ran.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from typer.testing import CliRunner

from curvedit.chartok import build_char_tokenizer
from curvedit.cli import app
from tests.tiny_models import ALPHABET, tiny_gpt2

runner = CliRunner()


class Workspace:
    """Paths of the shared inputs, and of the broken variants the rows use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.model = root / "model"
        self.corpus = root / "corpus.jsonl"
        self.factors = root / "factors"
        self.memorized = root / "memorized.jsonl"
        self.a_file = root / "a-file.txt"

    def out(self, name: str) -> Path:
        """An output path no row shares (never created by a failing command)."""
        return self.root / "outputs" / name


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("bad-inputs")
    w = Workspace(root)
    tokenizer = build_char_tokenizer(ALPHABET)
    model = tiny_gpt2(vocab=len(tokenizer), dtype=torch.float32)
    model.save_pretrained(w.model)
    tokenizer.save_pretrained(w.model)
    rows = [{"text": "the quick brown fox jumps over the lazy dog. " * 3}, {"text": "hello world, again and again."}]
    w.corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    w.memorized.write_text(json.dumps({"prefix": "the quick brown ", "suffix": "fox jumps"}) + "\n")
    w.a_file.write_text("a user's file\n")
    (root / "outputs").mkdir()
    done = runner.invoke(app, ["collect", "--model", str(w.model), "--data", str(w.corpus), "--out", str(w.factors),
                               "--seq-len", "16", "--no-progress"])
    assert done.exit_code == 0, done.output

    # broken models
    (root / "bad-config").mkdir()
    for item in w.model.iterdir():
        shutil.copy(item, root / "bad-config" / item.name)
    (root / "bad-config" / "config.json").write_text('{"model_type": "gpt2", "n_layer": ')
    (root / "pickled").mkdir()
    torch.save(model.state_dict(), root / "pickled" / "pytorch_model.bin")
    # broken factors
    for name, damage in (("truncated", lambda b: b[: len(b) // 2]), ("random-bytes", lambda b: os.urandom(len(b)))):
        shutil.copytree(w.factors, root / f"factors-{name}")
        tensors = root / f"factors-{name}" / "factors.safetensors"
        tensors.write_bytes(damage(tensors.read_bytes()))
    shutil.copytree(w.factors, root / "factors-bad-json")
    shutil.copytree(w.factors, root / "factors-copy")
    (root / "factors-bad-json" / "factors.json").write_text('{"format_version": 1, "targets": {')
    (root / "unfinished-sweep").mkdir()  # an interrupted sweep of other settings
    (root / "unfinished-sweep" / "sweep.journal.jsonl").write_text('{"journal": "sweep", "key": "another run"}\n')
    (root / "remote-code").mkdir()  # a folder whose config asks to run its own Python file
    shutil.copy(w.model / "config.json", root / "remote-code" / "config.json")
    remote = json.loads((root / "remote-code" / "config.json").read_text())
    remote.update(model_type="mystery", auto_map={"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"})
    (root / "remote-code" / "config.json").write_text(json.dumps(remote))
    (root / "remote-code" / "evil.py").write_text(f"open({str(root / 'RAN-REMOTE-CODE')!r}, 'w').write('ran')\n")
    # broken data
    (root / "plan.json").write_text('{"*.c_fc": 0.5,,}')
    (root / "plan-svd.json").write_text('{"rules": [{"pattern": "*", "rho": 0.6}], "method": "svd"}')
    (root / "corpus.json").write_text(json.dumps([{"text": "a json array, not JSON lines"}]))
    (root / "surrogate.jsonl").write_text('{"text": "fine"}\n{"text": "lone \\ud800 surrogate"}\n')
    (root / "tiny.jsonl").write_text(json.dumps({"text": "too short"}) + "\n")
    (root / "a-folder").mkdir()
    text = "the quick brown fox jumps over the lazy dog, again and again"
    (root / "canaries-twice.jsonl").write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": text}) + "\n")
    (root / "canaries-huge.jsonl").write_text(json.dumps({"text": text, "count": 10**9}) + "\n")
    (root / "windows-huge-id.jsonl").write_text(json.dumps({"prefix_ids": [3, 4, 5], "suffix_ids": [10**30, 4]}) + "\n")
    (root / "windows-negative.jsonl").write_text(json.dumps({"prefix_ids": [3, -4, 5], "suffix_ids": [6, 4]}) + "\n")
    (root / "windows-long.jsonl").write_text(json.dumps({"prefix_ids": [3] * 30, "suffix_ids": [4] * 10}) + "\n")
    other = build_char_tokenizer("abcdefghijklmnopqrstuvwxyz0123456789 .,\n")  # another vocabulary
    tiny_gpt2(vocab=len(other), dtype=torch.float32).save_pretrained(root / "other-vocab")
    other.save_pretrained(root / "other-vocab")
    (root / "members-as-nonmembers.jsonl").write_text(json.dumps({"text": "the quick brown fox jumps"}) + "\n")
    from tests.gguf_files import write_tiny_llama_gguf
    from tests.tiny_models import tiny_llama

    whole = write_tiny_llama_gguf(tiny_llama(), root / "whole.gguf")
    for name, cut in (("cut-header.gguf", 100), ("cut-tensors.gguf", whole.stat().st_size // 2)):
        (root / name).write_bytes(whole.read_bytes()[:cut])
    whole.unlink()
    shutil.copytree(w.factors, root / "factors-tampered")  # a symmetric permutation of A under an intact header
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(root / "factors-tampered" / "factors.safetensors"), "pt") as handle:
        kept_meta, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    key = next(k for k in tensors if k.endswith(".A"))
    order = [1, 0, *range(2, tensors[key].shape[0])]
    tensors[key] = tensors[key][order][:, order].contiguous()
    save_file(tensors, str(root / "factors-tampered" / "factors.safetensors"), metadata=kept_meta)
    (root / "canary-unknown.jsonl").write_text(json.dumps({"text": "THE QUICK BROWN FOX JUMPS OVER THE DOG"}) + "\n")
    (root / "no-metrics.json").write_text(json.dumps({"schema": "curvedit-evaluation/1", "name": "x"}))
    (root / "ids-bools.jsonl").write_text(json.dumps({"input_ids": [True, 3, 4, 5]}) + "\n")
    (root / "ids-outside.jsonl").write_text(json.dumps({"input_ids": [3, 4, 99, 5, 6, 7]}) + "\n")
    (root / "windows-outside.jsonl").write_text(json.dumps({"prefix_ids": [3, 4, 5], "suffix_ids": [99, 4]}) + "\n")
    return w


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root`: its kind, and a digest of each file's bytes."""
    state = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        state[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return state


def collect(w: Workspace, model: Path | str, out: Path, *extra) -> list:
    return ["collect", "--model", model, "--data", w.corpus, "--out", out, "--seq-len", 16, "--no-progress", *extra]


def edit(w: Workspace, model: Path | str, out: Path, *extra, factors: Path | None = None) -> list:
    return ["edit", "--model", model, "--factors", factors or w.factors, "--rho", 0.6, "--out", out, "--no-progress",
            *extra]


def evaluate(w: Workspace, model: Path | str, out: Path, *extra) -> list:
    return ["evaluate", "--model", model, "--memorized", w.memorized, "--stress", "none", "--out", out, "--no-progress",
            *extra]


def find_memorized(w: Workspace, model: Path | str, out: Path, *extra, data: Path | None = None) -> list:
    return ["find-memorized", "--model", model, "--data", data or w.corpus, "--prefix", 8, "--suffix", 4,
            "--out", out, "--no-progress", *extra]


def sweep(w: Workspace, model: Path | str, out: Path) -> list:
    return ["sweep", "--model", model, "--factors", w.factors, "--layers-grid", "0", "--rho-grid", "0.6",
            "--memorized", w.memorized, "--heldout", w.corpus, "--out", out, "--no-progress"]


def frontier(w: Workspace, out: Path, *extra) -> list:
    return ["frontier", "--model", w.model, "--memorized", w.memorized, "--heldout", w.corpus, "--out", out,
            "--no-progress", *extra]


def task_folder(w: Workspace) -> Path:
    """A folder with one task file, "mine" (two choice items)."""
    folder = w.root / "tasks"
    folder.mkdir(exist_ok=True)
    rows = [{"type": "choice", "prompt": "one two", "choices": [" three", " four"], "answer": 0}] * 2
    (folder / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def analyze(w: Workspace, model: Path | str, out: Path) -> list:
    return ["analyze", "--model", model, "--factors", w.factors, "--memorized", w.memorized, "--clean", w.corpus,
            "--out", out, "--no-progress"]


def bsn(w: Workspace, model: Path | str, out: Path) -> list:
    return ["baseline", "bsn", "--model", model, "--forget", w.memorized, "--retain", w.corpus, "--out", out,
            "--no-progress"]


def implant(w: Workspace, model: Path | str, out: Path) -> list:
    return ["implant", "--model", model, "--generate", 2, "--out", out, "--no-progress"]


def sample(w: Workspace, model: Path | str, out: Path) -> list:
    return ["sample", "--model", model, "--out", out, "--n", 2, "--seq-len", 8, "--no-progress"]


MODEL_COMMANDS = {"collect": collect, "edit": edit, "evaluate": evaluate, "find-memorized": find_memorized,
                  "sweep": sweep, "analyze": analyze, "baseline bsn": bsn, "implant": implant, "sample": sample}
FILE_OUTPUTS = {"evaluate": "r.json", "find-memorized": "m.jsonl", "sample": "s.jsonl"}

# (row id, arguments, a fragment the message must hold)
Row = tuple[str, Callable[[Workspace], list], str]
ROWS: list[Row] = []
for _name, _args in MODEL_COMMANDS.items():
    _file = FILE_OUTPUTS.get(_name, "dir")
    ROWS += [
        (f"{_name}: model path does not exist",
         lambda w, a=_args, f=_file: a(w, w.root / "no-such-model", w.out(f)), "no-such-model"),
        (f"{_name}: corrupt config.json",
         lambda w, a=_args, f=_file: a(w, w.root / "bad-config", w.out(f)), "config.json"),
    ]
for _name, _factors in (("truncated factors.safetensors", "factors-truncated"),
                        ("random bytes in factors.safetensors", "factors-random-bytes"),
                        ("malformed factors.json", "factors-bad-json")):
    _fragment = "factors.json" if "json" in _name else "factors.safetensors"
    ROWS += [
        (f"edit: {_name}", lambda w, d=_factors: edit(w, w.model, w.out("e"), factors=w.root / d), _fragment),
        (f"spectrum: {_name}", lambda w, d=_factors: ["spectrum", w.root / d, "--out", w.out("s")], _fragment),
        (f"merge: {_name}", lambda w, d=_factors: ["merge", w.factors, w.root / d, "--out", w.out("m")], _fragment),
        (f"analyze: {_name}", lambda w, d=_factors: ["analyze", "--model", w.model, "--factors", w.root / d,
                                                    "--memorized", w.memorized, "--clean", w.corpus,
                                                    "--out", w.out("a"), "--no-progress"], _fragment),
    ]
ROWS += [
    ("edit: malformed plan.json",
     lambda w: ["edit", "--model", w.model, "--factors", w.factors, "--plan", w.root / "plan.json",
                "--out", w.out("e"), "--no-progress"], "plan.json"),
    ("collect: input_ids outside the vocabulary",
     lambda w: ["collect", "--model", w.model, "--data", w.root / "ids-outside.jsonl", "--out", w.out("c"),
                "--seq-len", 16, "--no-progress"], "token id 99 is outside"),
    ("evaluate: memorized windows outside the vocabulary",
     lambda w: ["evaluate", "--model", w.model, "--memorized", w.root / "windows-outside.jsonl", "--stress", "none",
                "--out", w.out("r.json"), "--no-progress"], "token id 99 is outside"),
    ("find-memorized: input_ids outside the vocabulary",
     lambda w: find_memorized(w, w.model, w.out("m.jsonl"), data=w.root / "ids-outside.jsonl") + ["--prefix", 2,
                                                                                                 "--suffix", 2],
     "token id 99 is outside"),
    ("edit: --plan with --rho", lambda w: edit(w, w.model, w.out("e"), "--plan", w.root / "plan-svd.json"),
     "--plan gives the amounts"),
    ("edit: the plan's method and --method disagree",
     lambda w: ["edit", "--model", w.model, "--factors", w.factors, "--plan", w.root / "plan-svd.json",
                "--method", "kfac", "--out", w.out("e"), "--no-progress"], "also given"),
    ("edit: a keep fraction that keeps nothing",
     lambda w: ["edit", "--model", w.model, "--factors", w.factors, "--keep-fraction", 1e-9, "--out", w.out("e"),
                "--no-progress"], "keeps no component"),
    ("merge: the same factors twice", lambda w: ["merge", w.factors, w.root / "factors-copy", "--out", w.out("m")],
     "same factors"),
    ("evaluate: --loose-threshold outside (0, 1]",
     lambda w: evaluate(w, w.model, w.out("r.json"), "--loose-threshold", 5), "loose threshold"),
    ("evaluate: --stress of an unknown kind",
     lambda w: evaluate(w, w.model, w.out("r.json"), "--stress", "shuffle"), "--stress must be"),
    ("evaluate: --stress-t 0", lambda w: evaluate(w, w.model, w.out("r.json"), "--stress", "reference",
                                                  "--stress-t", 0), "t must be at least 1"),
    ("evaluate: --ndcg-gain of an unknown kind",
     lambda w: evaluate(w, w.model, w.out("r.json"), "--ndcg-gain", "logit"), "unknown nDCG gain"),
    ("evaluate: --mia without --memorized",
     lambda w: ["evaluate", "--model", w.model, "--heldout", w.corpus, "--mia", w.corpus, "--out", w.out("r.json"),
                "--no-progress"], "give --memorized"),
    ("evaluate: --mia text shorter than one memorized window",
     lambda w: evaluate(w, w.model, w.out("r.json"), "--mia", w.root / "tiny.jsonl"), "no window of 25 tokens"),
    ("evaluate: --min-k 0", lambda w: evaluate(w, w.model, w.out("r.json"), "--mia", w.corpus, "--min-k", 0),
     "min-k% needs k"),
    ("evaluate: --samples -1", lambda w: evaluate(w, w.model, w.out("r.json"), "--samples", -1), "--samples"),
    ("evaluate: --temperature 0", lambda w: evaluate(w, w.model, w.out("r.json"), "--samples", 4,
                                                     "--temperature", 0), "temperature"),
    ("evaluate: --reference without --heldout or --mia",
     lambda w: evaluate(w, w.model, w.out("r.json"), "--reference", w.model), "--mia"),
    ("edit: --masses ekfac on factors collected without --eigencorrect",
     lambda w: edit(w, w.model, w.out("e"), "--masses", "ekfac"), "collect --eigencorrect"),
    ("edit: --masses of an unknown kind", lambda w: edit(w, w.model, w.out("e"), "--masses", "fisher"),
     "unknown masses"),
    ("attack relearn: --steps not ascending",
     lambda w: ["attack", "relearn", "--model", w.model, "--memorized", w.memorized, "--data", w.corpus,
                "--steps", "10,5", "--out", w.out("r.json"), "--no-progress"], "ascending"),
    ("attack relearn: neither --data nor --windows",
     lambda w: ["attack", "relearn", "--model", w.model, "--memorized", w.memorized, "--out", w.out("r.json"),
                "--no-progress"], "--data"),
    ("attack quantize: --bits 1",
     lambda w: ["attack", "quantize", "--model", w.model, "--memorized", w.memorized, "--bits", "1",
                "--out", w.out("q.json"), "--no-progress"], "--bits"),
    ("attack quantize: --out is an existing file",
     lambda w: ["attack", "quantize", "--model", w.model, "--memorized", w.memorized, "--out", w.a_file,
                "--no-progress"], "--overwrite"),
    ("edit: --forget with --masses ekfac", lambda w: edit(w, w.model, w.out("e"), "--forget", w.memorized,
                                                           "--masses", "ekfac"), "--forget ranks"),
    ("edit: --masses targeted without --forget",
     lambda w: edit(w, w.model, w.out("e"), "--masses", "targeted"), "needs --forget"),
    ("converge: --factors-a without --factors-b",
     lambda w: ["converge", "--factors-a", w.factors, "--out", w.out("c.json")], "go together"),
    ("converge: neither factors nor a model",
     lambda w: ["converge", "--out", w.out("c")], "--model and --data"),
    ("converge: budgets not ascending",
     lambda w: ["converge", "--model", w.model, "--data", w.corpus, "--tokens", "50,20", "--seq-len", 16,
                "--out", w.out("c"), "--no-progress"], "ascending"),
    ("sweep: --loose-threshold outside (0, 1]",
     lambda w: sweep(w, w.model, w.out("sweep")) + ["--loose-threshold", 0], "loose threshold"),
    ("baseline bsn: --lr nan", lambda w: bsn(w, w.model, w.out("b")) + ["--lr", "nan"], "lr must be"),
    ("collect: --seq-len past the model's context window",
     lambda w: collect(w, w.model, w.out("c")) + ["--seq-len", 64], "context window"),
    ("collect: --out is an existing file", lambda w: collect(w, w.model, w.a_file), "is a file"),
    ("collect: an unknown label mode", lambda w: collect(w, w.model, w.out("c"), "--labels", "guessed"),
     "label mode (--labels) must be one of sampled"),
    ("collect: an unknown accumulate dtype",
     lambda w: collect(w, w.model, w.out("c"), "--accumulate-dtype", "int8"), "(--accumulate-dtype) must be one of"),
    ("collect: a checkpoint interval of 0", lambda w: collect(w, w.model, w.out("c"), "--checkpoint-every", 0),
     "(--checkpoint-every) must be at least 1"),
    ("collect: 0 layers per pass", lambda w: collect(w, w.model, w.out("c"), "--layers-per-pass", 0),
     "(--layers-per-pass) must be at least 1"),
    ("edit: an unknown eigh precision", lambda w: edit(w, w.model, w.out("e"), "--eigh-precision", "half"),
     "eigh precision must be one of"),
    ("edit: an unknown method", lambda w: edit(w, w.model, w.out("e"), "--method", "magic"),
     "unknown method 'magic'"),
    ("edit: --out is an existing file", lambda w: edit(w, w.model, w.a_file), "is a file"),
    ("implant: --out is an existing file", lambda w: implant(w, w.model, w.a_file), "is a file"),
    ("implant: --preserve of an unknown kind",
     lambda w: implant(w, w.model, w.out("i")) + ["--preserve", "mse"], "preserve must be one of"),
    ("implant: --kl-weight 0", lambda w: implant(w, w.model, w.out("i")) + ["--kl-weight", 0], "kl_weight"),
    ("implant: --lr-schedule of an unknown kind",
     lambda w: implant(w, w.model, w.out("i")) + ["--lr-schedule", "step"], "lr_schedule"),
    ("implant: --replay-samples 0",
     lambda w: implant(w, w.model, w.out("i")) + ["--replay-samples", 0], "--replay-samples"),
    ("sample: --n 0", lambda w: sample(w, w.model, w.out("s.jsonl")) + ["--n", 0], "number of sequences"),
    ("sample: --temperature 0", lambda w: sample(w, w.model, w.out("s.jsonl")) + ["--temperature", 0],
     "temperature"),
    ("sample: --seq-len past the model's context window",
     lambda w: sample(w, w.model, w.out("s.jsonl")) + ["--seq-len", 64], "context window"),
    ("sample: --start-id outside the vocabulary",
     lambda w: sample(w, w.model, w.out("s.jsonl")) + ["--start-id", 10_000], "outside the vocabulary"),
    ("sample: --out is an existing file (no --overwrite)", lambda w: sample(w, w.model, w.a_file), "--overwrite"),
    ("capabilities: an unknown family",
     lambda w: ["capabilities", "--out", w.out("caps"), "--families", "add_1d,poetry"], "poetry"),
    ("capabilities: an unknown format",
     lambda w: ["capabilities", "--out", w.out("caps"), "--format", "essay"], "unknown task format"),
    ("capabilities: --n 0", lambda w: ["capabilities", "--out", w.out("caps"), "--n", 0], "items per family"),
    ("sweep: --probe-floor outside (0, 1]",
     lambda w: sweep(w, w.model, w.out("sweep")) + ["--probe-floor", 1.5], "probe floor"),
    ("frontier: an unknown method",
     lambda w: frontier(w, w.out("fr"), "--factors", w.factors, "--methods", "kfac,shampoo"), "shampoo"),
    ("frontier: a keep fraction of 1",
     lambda w: frontier(w, w.out("fr"), "--factors", w.factors, "--keep-grid", "0.5,1"), "keep fractions"),
    ("frontier: kfac without --factors",
     lambda w: frontier(w, w.out("fr"), "--methods", "kfac"), "--factors is needed"),
    ("sweep: --probe-floor FAMILY= without a share",
     lambda w: sweep(w, w.model, w.out("sweep")) + ["--probe-floor", "open_book=high"], "FAMILY=share"),
    ("sweep: --probe-floor names a family the probes do not have",
     lambda w: sweep(w, w.model, w.out("sweep")) + ["--tasks", task_folder(w), "--probe-floor", "poetry=0.9"],
     "the probe floor names poetry"),
    ("sweep: --probe-floor without --tasks",
     lambda w: sweep(w, w.model, w.out("sweep")) + ["--probe-floor", 0.9], "--probe-floor needs --tasks"),
    ("find-memorized: --out is an existing folder",
     lambda w: find_memorized(w, w.model, w.root / "a-folder"), "is a folder"),
    ("evaluate: --out is an existing file (no --overwrite)",
     lambda w: evaluate(w, w.model, w.a_file), "--overwrite"),
    ("collect: --out under a regular file", lambda w: collect(w, w.model, w.a_file / "factors"), "is a file"),
    ("edit: --out under a regular file", lambda w: edit(w, w.model, w.a_file / "edited"), "is a file"),
    ("evaluate: --out under a regular file", lambda w: evaluate(w, w.model, w.a_file / "r.json"), "is a file"),
    ("sweep: --out under a regular file", lambda w: sweep(w, w.model, w.a_file / "sweep"), "is a file"),
    ("collect: a folder holding only pytorch_model.bin",
     lambda w: collect(w, w.root / "pickled", w.out("c")), "config.json"),
    ("edit: a folder holding only pytorch_model.bin",
     lambda w: edit(w, w.root / "pickled", w.out("e")), "config.json"),
    ("collect: --seq-len 0 (not the default)", lambda w: collect(w, w.model, w.out("c")) + ["--seq-len", 0],
     "at least 2"),
    ("collect: input_ids holding true/false",
     lambda w: ["collect", "--model", w.model, "--data", w.root / "ids-bools.jsonl", "--out", w.out("c"),
                "--no-progress"], "not true/false"),
    ("converge: --keep-fraction 0 (not the default)",
     lambda w: ["converge", "--factors-a", w.factors, "--factors-b", w.factors, "--keep-fraction", 0,
                "--out", w.out("conv.json")], "keep_fraction"),
    *[(f"implant: {what}", lambda w, f=file: ["implant", "--model", w.model, "--canaries", w.root / f, "--prefix", 8,
                                              "--suffix", 8, "--seq-len", 16, "--out", w.out("i"), "--no-progress"],
       fragment) for what, file, fragment in [("the same canary twice", "canaries-twice.jsonl", "same text"),
                                              ("a count of 10**9", "canaries-huge.jsonl", "count 1000000000")]],
    ("implant: --seq-len past the model's context window",
     lambda w: implant(w, w.model, w.out("i")) + ["--prefix", 8, "--suffix", 8, "--seq-len", 100_000],
     "context window"),
    *[(f"{name}: memorized windows with {what}", lambda w, b=build, f=file: b(w, w.root / f), fragment)
      for name, build in [("edit --forget", lambda w, f: edit(w, w.model, w.out("e"), "--forget", f)),
                          ("attack relearn --windows", lambda w, f: ["attack", "relearn", "--model", w.model,
                                                                     "--memorized", w.memorized, "--windows", f,
                                                                     "--out", w.out("r.json"), "--no-progress"]),
                          ("attack relearn --memorized", lambda w, f: ["attack", "relearn", "--model", w.model,
                                                                       "--memorized", f, "--data", w.corpus,
                                                                       "--out", w.out("r.json"), "--no-progress"])]
      for what, file, fragment in [("an id past the vocabulary", "windows-outside.jsonl", "token id 99"),
                                   ("an id of 10**30", "windows-huge-id.jsonl", "token id 1000000000000"),
                                   ("a negative id", "windows-negative.jsonl", "token id -4"),
                                   ("a window longer than the context", "windows-long.jsonl", "context window")]],
    ("attack relearn: an lr that makes the fine-tuning diverge",
     lambda w: ["attack", "relearn", "--model", w.model, "--memorized", w.memorized, "--data", w.corpus,
                "--lr", "1e12", "--steps", "0,20", "--seq-len", 16, "--out", w.out("r.json"), "--no-progress"],
     "diverged"),
    ("evaluate: --reference with another vocabulary",
     lambda w: evaluate(w, w.model, w.out("r.json"), "--reference", w.root / "other-vocab", "--heldout", w.corpus),
     "another output vocabulary size"),
    ("evaluate: --mia non-members that are the memorized windows",
     lambda w: evaluate(w, w.model, w.out("r.json"), "--mia", w.root / "members-as-nonmembers.jsonl"),
     "are memorized windows themselves"),
    *[(f"collect: a GGUF file {what}", lambda w, f=file: collect(w, w.root / f, w.out("c")), "not a complete GGUF")
      for what, file in [("cut inside its header", "cut-header.gguf"), ("cut inside its tensors", "cut-tensors.gguf")]],
    ("converge: --out inside an input factor folder (--overwrite)",
     lambda w: ["converge", "--factors-a", w.factors, "--factors-b", w.root / "factors-copy", "--out",
                w.factors / "factors.json", "--overwrite"], "inside the input folder"),
    ("edit: a factor tensor altered under an intact header",
     lambda w: edit(w, w.model, w.out("e"), factors=w.root / "factors-tampered"), "checksum"),
    ("implant: a canary in characters the tokenizer does not know",
     lambda w: ["implant", "--model", w.model, "--canaries", w.root / "canary-unknown.jsonl", "--prefix", 8,
                "--suffix", 8, "--seq-len", 16, "--out", w.out("i"), "--no-progress"], "does not know"),
    ("edit: --protect a folder without factors",
     lambda w: edit(w, w.model, w.out("e"), "--protect", w.root / "a-folder"), "not a factor directory"),
    ("edit: --protect-rho without --protect",
     lambda w: edit(w, w.model, w.out("e"), "--protect-rho", 0.9), "give the protect factors"),
    ("edit: --protect factors altered under an intact header",
     lambda w: edit(w, w.model, w.out("e"), "--protect", w.root / "factors-tampered"), "checksum"),
    ("sweep: an unfinished run in --out, no --resume",
     lambda w: sweep(w, w.model, w.root / "unfinished-sweep"), "pass --resume to continue it"),
    ("sweep: --resume with no unfinished run", lambda w: sweep(w, w.model, w.out("sweep")) + ["--resume"],
     "no unfinished run"),
    ("sweep: --resume of another sweep's journal",
     lambda w: sweep(w, w.model, w.root / "unfinished-sweep") + ["--resume"], "another sweep's finished items"),
    ("frontier: --resume with no unfinished run", lambda w: frontier(w, w.out("f"), "--factors", w.factors, "--resume"),
     "no unfinished run"),
    ("layer-map: --resume with no unfinished run",
     lambda w: ["layer-map", "--model", w.model, "--factors", w.factors, "--memorized", w.memorized, "--heldout",
                w.corpus, "--out", w.out("map"), "--resume", "--no-progress"], "no unfinished run"),
    ("layer-map: --keep-fraction 1 (edits nothing)",
     lambda w: ["layer-map", "--model", w.model, "--factors", w.factors, "--memorized", w.memorized, "--heldout",
                w.corpus, "--keep-fraction", 1, "--out", w.out("map"), "--no-progress"], "keep fraction"),
    ("score: --flat-fraction 1", lambda w: ["score", "--model", w.model, "--factors", w.factors, "--data", w.corpus,
                                            "--flat-fraction", 1, "--out", w.out("s.jsonl"), "--no-progress"],
     "--flat-fraction"),
    ("edit: --method identity without saliency masses",
     lambda w: edit(w, w.model, w.out("e"), "--method", "identity"), "masses 'saliency'"),
    ("edit: --block not PxQ", lambda w: ["edit", "--model", w.model, "--factors", w.factors, "--block", "big",
                                         "--out", w.out("e"), "--no-progress"], "--block expects PxQ"),
    ("edit: --step-norm without --step-from",
     lambda w: edit(w, w.model, w.out("e"), "--step-norm", 0.1), "give the memorized windows"),
    ("edit: --step-from with --method svd",
     lambda w: edit(w, w.model, w.out("e"), "--step-from", w.memorized, "--step-norm", 0.1, "--method", "svd"),
     "without --method"),
    ("edit: --step-from without --step-norm or --ppl-budget",
     lambda w: edit(w, w.model, w.out("e"), "--step-from", w.memorized), "one of --step-norm or --ppl-budget"),
    ("edit: a negative --step-norm",
     lambda w: edit(w, w.model, w.out("e"), "--step-from", w.memorized, "--step-norm", -1), "finite number >= 0"),
    ("edit: --step-from a windows file that does not exist",
     lambda w: edit(w, w.model, w.out("e"), "--step-from", w.root / "no-such.jsonl", "--step-norm", 0.1),
     "no-such.jsonl"),
    ("edit: --side with svd", lambda w: edit(w, w.model, w.out("e"), "--side", "G", "--method", "svd"),
     "need method kfac"),
    ("report: a results file without \"metrics\"",
     lambda w: ["report", w.root / "no-metrics.json", "--out", w.out("rep")], "without its"),
    *[(f"study smollm2: {flag} {value!r}", lambda w, f=flag, v=value: ["study", "smollm2", "--out", w.out("study"),
                                                                         f, v, "--no-progress"], fragment)
      for flag, value, fragment in [("--seeds", "", "seeds"), ("--canaries", 0, "canaries must be"),
                                    ("--ppl-budget", 0.5, "perplexity budget"),
                                    ("--layers-grid", "50-60", "outside SmolLM2-135M's blocks"),
                                    ("--layers-grid", "3-x", "bad layer range"),
                                    ("--probe-floor", 2, "probe floor"), ("--preserve", "mse", "preserve must be"),
                                    ("--probe-floor", "poetry=0.9", "unknown family 'poetry'"),
                                    ("--replay-samples", -1, "replay_samples"),
                                    ("--factor-data", "wiki", "factor_data must be one of")]],
    ("collect: a model folder that needs remote code (auto_map)",
     lambda w: collect(w, w.root / "remote-code", w.out("c")), "never runs a model folder's code"),
    ("evaluate: a model folder that needs remote code (auto_map)",
     lambda w: evaluate(w, w.root / "remote-code", w.out("r.json")), "never runs a model folder's code"),
    ("collect: a corpus .json file that exists",
     lambda w: ["collect", "--model", w.model, "--data", w.root / "corpus.json", "--out", w.out("c"),
                "--no-progress"], "corpus.json"),
    ("find-memorized: a corpus .json file that exists",
     lambda w: find_memorized(w, w.model, w.out("m.jsonl"), data=w.root / "corpus.json"), "corpus.json"),
    ("find-memorized: a lone surrogate in a JSONL text row",
     lambda w: find_memorized(w, w.model, w.out("m.jsonl"), data=w.root / "surrogate.jsonl"), "surrogate.jsonl:2"),
    ("evaluate: a lone surrogate in the held-out JSONL",
     lambda w: evaluate(w, w.model, w.out("r.json"), "--heldout", w.root / "surrogate.jsonl"), "surrogate.jsonl:2"),
]
CUDA_ROWS: list[Row] = [
    ("collect: --device cuda without CUDA", lambda w: collect(w, w.model, w.out("c"), "--device", "cuda"), "CUDA"),
    ("edit: --device cuda without CUDA", lambda w: edit(w, w.model, w.out("e"), "--device", "cuda"), "CUDA"),
    ("evaluate: --device cuda:0 without CUDA",
     lambda w: evaluate(w, w.model, w.out("r.json"), "--device", "cuda:0"), "CUDA"),
    ("find-memorized: --device cuda without CUDA",
     lambda w: find_memorized(w, w.model, w.out("m.jsonl"), "--device", "cuda"), "CUDA"),
]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")


def check_one_line_error(ws: Workspace, args: list, fragment: str) -> str:
    before = snapshot(ws.root)
    result = runner.invoke(app, [str(a) for a in args])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert snapshot(ws.root) == before, "the failed command changed the workspace"
    return lines[0]


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_one_error_line_and_exit_2(ws, row):
    _, build, fragment = row
    message = check_one_line_error(ws, build(ws), fragment)
    assert "not found" not in message or "no-such" in message


@no_cuda
@pytest.mark.parametrize("row", CUDA_ROWS, ids=[r[0] for r in CUDA_ROWS])
def test_device_cuda_without_cuda_is_refused_before_loading(ws, row):
    _, build, fragment = row
    check_one_line_error(ws, build(ws), fragment)


def test_a_bug_is_not_turned_into_a_user_error(ws, monkeypatch):
    """A ValueError from a bug (not a curvedit error) keeps its traceback: exit status 1."""
    import curvedit.models

    def broken(*args, **kwargs):
        return int("not a number")

    monkeypatch.setattr(curvedit.models, "load_model", broken)
    result = runner.invoke(app, [str(a) for a in edit(ws, ws.model, ws.out("bug"))])
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)
    assert "error:" not in result.stderr


def _deliberate_value_error() -> ValueError:
    """The EvaluateError `curvedit.evaluate.generation` raises for a prompt past the context window."""
    from curvedit.evaluate.generation import check_fits_context

    try:
        check_fits_context(tiny_gpt2(), 1000, "a prompt")
    except ValueError as err:
        return err
    raise AssertionError("check_fits_context accepted 1000 tokens")


def _safetensor_error() -> Exception:
    from safetensors import SafetensorError

    return SafetensorError("Error while deserializing header: header too small")


@pytest.mark.parametrize("err, expected", [
    (OSError(28, "No space left on device", "/data/out/model.safetensors"),
     "/data/out/model.safetensors: No space left on device"),
    (FileNotFoundError(2, "No such file or directory", "x.jsonl"), "x.jsonl: No such file or directory"),
    (PermissionError(13, "Permission denied", "/root/x"), "/root/x: Permission denied"),
    (json.JSONDecodeError("Expecting value", "{", 1), "not valid JSON (Expecting value: line 1 column 2)"),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "not UTF-8 text (invalid start byte at byte 0)"),
    (_safetensor_error(), "header too small"),
    (_deliberate_value_error(), "longer than the model's context window"),
    (ValueError("factors do not match this model:\n  a: differ\n  b: differ"), None),
    (OSError(104, "Connection reset by peer"), None),
    (RuntimeError("CUDA error: device-side assert triggered"), None),
    (AssertionError("Torch not compiled with CUDA enabled"), None),
    (KeyError("weight"), None),
])
def test_the_handler_maps_user_errors_and_leaves_bugs_alone(err, expected):
    from curvedit.cli.common import user_error_message

    message = user_error_message(err)
    if expected is None:
        assert message is None
    else:
        assert message is not None and expected in message and "\n" not in message


def test_a_curvedit_error_over_several_lines_prints_as_one():
    from curvedit.cli.common import user_error_message
    from curvedit.kfac.factors import FactorError

    message = user_error_message(FactorError("factors do not match this model:\n  a: differ\n  b: differ"))
    assert message == "factors do not match this model: a: differ; b: differ"


def test_every_error_type_of_curvedit_is_a_curvedit_error_and_a_value_error():
    import importlib
    import pkgutil

    import curvedit
    from curvedit.errors import CurveditError

    found = {}
    for info in pkgutil.walk_packages(curvedit.__path__, "curvedit."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if (isinstance(value, type) and issubclass(value, Exception) and name.endswith("Error")
                    and value.__module__.startswith("curvedit")):
                found[name] = value
    assert {"DataError", "TargetError", "CollectError", "FactorError", "EditError", "SelectionError", "EighError",
            "SweepError", "BudgetError", "BSNError", "AnalysisError", "DistributedError", "ImplantError",
            "TaskFormatError", "ModelLoadError", "MemoryPlanError", "ObjectiveError", "EvaluateError"} <= set(found)
    assert [name for name, cls in found.items() if not issubclass(cls, CurveditError)] == []
    assert all(issubclass(cls, ValueError) for cls in found.values())


def test_ctrl_c_during_collection_says_where_the_checkpoint_is(ws, monkeypatch):
    import curvedit.kfac.collect

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(curvedit.kfac.collect, "collect_factors", interrupted)
    out = ws.out("interrupted")
    result = runner.invoke(app, [str(a) for a in collect(ws, ws.model, out, "--checkpoint-every", 7)])
    assert result.exit_code == 130
    assert f"the last checkpoint (every 7 batches) is in {out}" in result.stderr and "--resume" in result.stderr
