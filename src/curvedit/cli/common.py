"""What every `curvedit` command shares: its options, the one error handler and the one output guard.

- Options: `model_option()`, `DeviceOpt`, `DtypeOpt`, `ProgressOpt`, `TextFieldOpt`,
  `overwrite_option()`, `out_option()` and the target options (`preset_option()`,
  `targets_option()`, `LayersOpt`), declared once here.
- Errors: `user_errors()` turns the errors that mean "this input cannot be used" into one line
  `error: ...` on stderr and exit status 2; the root command group runs every command inside it
  (`CurveditGroup`). Anything else is a bug and surfaces as its traceback. `fail(message)`
  raises such an error for a check made by a command itself.
- Output: `check_output()` refuses an output before any compute starts: a file where a folder is
  expected (or the reverse), output that exists without `--overwrite`, the input model's own
  folder, or a location that cannot be written.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import tempfile
from pathlib import Path
from typing import Any, Iterator, NoReturn, Optional, Sequence

import click
import typer
from typer.core import TyperGroup

from curvedit.errors import CurveditError

EXIT_USER_ERROR = 2


# ---------------------------------------------------------------------------------------------
# Errors


@contextlib.contextmanager
def resumable(out: Path, what: str) -> Iterator[None]:
    """On Ctrl-C, say where the last checkpoint is and how to continue, then exit 130.

    Args:
        out: the output folder that holds the run's checkpoints.
        what: how to name the checkpoint ("the last checkpoint (every 50 batches)").
    """
    try:
        yield
    except KeyboardInterrupt:
        typer.secho(f"interrupted: {what} is in {out}; run the same command with --resume to continue",
                    fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(code=130) from None


def fail(message: str) -> NoReturn:
    """Stop the command: `error: MESSAGE` on stderr, exit status 2 (no traceback)."""
    raise CurveditError(message)


# OSErrors that mean the file system refused (the user's paths, permissions, a full disk), not a bug.
_USER_OS_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
_USER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG})

def _safetensor_error() -> type[BaseException]:
    from safetensors import SafetensorError

    return SafetensorError


def user_error_message(err: BaseException) -> str | None:
    """The one-line message for an error that means "this input cannot be used"; None for a bug.

    Mapped: every `CurveditError`; missing, existing, wrong-kind or unreadable paths
    (`FileNotFoundError`, `FileExistsError`, `IsADirectoryError`, `NotADirectoryError`,
    `PermissionError`); a full disk or quota, a read-only file system, a name too long;
    `json.JSONDecodeError`; a damaged safetensors file (`SafetensorError`); bytes that are not
    UTF-8 (`UnicodeDecodeError`).
    """
    if isinstance(err, json.JSONDecodeError):
        message = f"not valid JSON ({err.msg}: line {err.lineno} column {err.colno})"
    elif isinstance(err, CurveditError):
        message = str(err)
    elif isinstance(err, OSError) and (isinstance(err, _USER_OS_ERRORS) or err.errno in _USER_ERRNOS):
        if err.strerror and err.filename is not None:
            message = f"{err.filename}: {err.strerror}"
        elif err.strerror:
            message = err.strerror
        else:
            message = str(err)
    elif isinstance(err, UnicodeDecodeError):
        message = f"not UTF-8 text ({err.reason} at byte {err.start})"
    elif isinstance(err, _safetensor_error()):
        message = f"a safetensors file cannot be read or written ({err})"
    else:
        return None
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return lines[0] + (" " + "; ".join(lines[1:]) if len(lines) > 1 else "")


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Run a command: an error `user_error_message` maps becomes one line `error: ...` on stderr
    and exit status 2; every other exception propagates unchanged (a traceback)."""
    try:
        yield
    except Exception as err:  # re-raised below unless it is a user error
        if isinstance(err, (click.exceptions.ClickException, click.exceptions.Exit)):
            raise  # click's own usage errors and exits
        message = user_error_message(err)
        if message is None:
            raise
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=EXIT_USER_ERROR) from None


class CurveditGroup(TyperGroup):
    """The root command group: every command (and subgroup) runs inside `user_errors()`,
    option callbacks such as the `--device` check included."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; a CurveditError becomes one `error:` line and exit status 2."""
        try:
            with user_errors():
                return super().invoke(ctx)
        finally:
            release_outputs()


# ---------------------------------------------------------------------------------------------
# Shared options


def check_device(device: str) -> str:
    """Refuse a `--device` this machine does not have, before anything is loaded.

    Raises:
        CurveditError: not a device name torch knows, CUDA (or MPS) asked for where it is not
            available, or a CUDA index beyond the visible devices.
    """
    import torch  # here, not at the top: keeps `curvedit --help` fast

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        fail(f"--device {device!r}: not a device name (cpu, cuda, cuda:1, ...)")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            built = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            fail(f"--device {device}: CUDA is not available here ({built}); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            fail(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            fail(f"--device {device}: MPS is not available here; use --device cpu")
    elif parsed.type != "cpu":
        backend = getattr(torch, parsed.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            fail(f"--device {device}: not available here; use --device cpu")
    return device


def _device_callback(value: Optional[str]) -> Optional[str]:
    return None if value is None else check_device(value)


def model_option(text: str = "HF model name, local directory or .gguf file.") -> Any:
    """The `--model` option."""
    return typer.Option(..., "--model", "-m", help=text)


def preset_option(text: str = "Target preset: mlp, mlp-in, mlp-out [default: mlp].") -> Any:
    """The `--preset` option."""
    return typer.Option(None, "--preset", help=text)


def targets_option(text: str = "Module-name glob (or 're:REGEX'); repeatable.") -> Any:
    """The repeatable `--targets` option."""
    return typer.Option(None, "--targets", "-t", help=text)


def overwrite_option(text: str = "Replace existing output.") -> Any:
    """The `--overwrite/--no-overwrite` flag."""
    return typer.Option(False, "--overwrite/--no-overwrite", help=text)


def out_option(text: str, default: Any = ...) -> Any:
    """The `--out` option."""
    return typer.Option(default, "--out", "-o", help=text)


def device_option(text: str = "cpu, cuda, cuda:1, ... (checked before anything is loaded).") -> Any:
    """The `--device` option, checked before anything is loaded."""
    return typer.Option("cpu", "--device", help=text, callback=_device_callback)


LayersOpt = typer.Option(None, "--layers", help="Layer range, e.g. 23-25 or 0,3,5-7.")
DeviceOpt = device_option()
DtypeOpt = typer.Option(None, "--dtype", help="Load weights as bf16/fp16/float32.")
ProgressOpt = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr.")
TextFieldOpt = typer.Option("text", "--text-field", help="JSON field with the text.")
HeldoutSeqLenOpt = typer.Option(512, "--heldout-seq-len", help="Held-out sequence length.")
HeldoutMaxTokensOpt = typer.Option(100_000, "--heldout-max-tokens", help="Held-out token budget.")
BatchSizeOpt = typer.Option(16, "--batch-size", help="Sequences per forward pass / decoding batch.")


def target_spec(preset: Optional[str], targets: Optional[list[str]], layers: Optional[str]):
    """Build a TargetSpec from CLI options; default preset is 'mlp'."""
    from curvedit.kfac.targets import TargetSpec

    if not preset and not targets:
        preset = "mlp"
    return TargetSpec(patterns=tuple(targets or ()), preset=preset, layers=layers)


def int_list(text: str, option: str) -> tuple[int, ...]:
    """Comma-separated integers of an option ("16,32")."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        fail(f"{option}: expected comma-separated integers, got {text!r}")


def float_list(text: Optional[str], option: str) -> tuple[float, ...]:
    """Comma-separated numbers of an option ("0.6,0.75"); () for none."""
    if not text:
        return ()
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        fail(f"{option}: expected comma-separated numbers, got {text!r}")


# ---------------------------------------------------------------------------------------------
# The output guard


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _check_writable(out: Path, option: str) -> None:
    """Check that `out` can be created: its nearest existing ancestor must be a folder where a
    file can be written (a temporary file is written and removed). Creates nothing else."""
    probe = out if out.is_dir() else out.parent
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        fail(f"{option} {out}: cannot be created: {probe} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".curvedit-write-test-"):
            pass
    except OSError as err:
        fail(f"{option} {out}: cannot write in {probe} ({err.strerror or err})")


def is_temporary(path: Path) -> bool:
    """Whether `path` is a temporary file of curvedit's atomic writes (`.NAME.XXXX.tmp`)."""
    import re

    return path.is_file() and re.fullmatch(r"\..+\.[A-Za-z0-9_]{8}\.tmp", path.name) is not None


_HELD_LOCKS: list[Any] = []
OUTPUT_STAMP = ".curvedit-output"  # marks a reusable folder (demo, study) as curvedit's own


REPORT_FILES = ("report.md", "results.json", "*.png")  # what demo and study write into their folder


def reuse_output(out: Path, overwrite: bool = False) -> None:
    """The guard of a folder a command caches its stages in and writes its report into (demo,
    study): `check_output` with `reuse`, then the stamp that marks it as curvedit's.

    Raises:
        CurveditError: as `check_output` (a user's report files there without `overwrite`, ...).
    """
    check_output(out, kind="dir", reuse=True, names=REPORT_FILES, overwrite=overwrite)
    stamp_output(out)


def stamp_output(out: Path) -> None:
    """Mark a reusable output folder as curvedit's: later runs may replace the files it wrote."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = out / OUTPUT_STAMP
    if not stamp.exists():
        stamp.write_text("This folder is written by curvedit (demo / study); a rerun replaces its reports.\n")


def lock_output(out: Path, option: str = "--out") -> None:
    """Hold an exclusive lock on an output path until `release_outputs` (the end of the
    command; the end of the process at the latest), so two runs never write one output.

    The lock is a file in the temporary folder named by the output's resolved path: nothing
    is written beside the user's files. Under torchrun only rank 0 (which writes the outputs)
    takes it; where `fcntl` does not exist (Windows) nothing is locked.

    Raises:
        CurveditError: another run holds the lock (the message names its process id).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        return
    import hashlib
    import os

    if os.environ.get("RANK", "0") != "0":
        return
    folder = Path(tempfile.gettempdir()) / f"curvedit-locks-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
    except OSError:  # pragma: no cover - an unwritable temporary folder: run unlocked
        return
    key = hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:32]
    handle = open(folder / f"{key}.lock", "a+")  # held until release_outputs
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        fail(f"{option} {out} is being written by another curvedit run (process {holder}); wait for it to end "
             "or give another path")
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    _HELD_LOCKS.append(handle)


def release_outputs() -> None:
    """Release every output lock this process holds (`lock_output`)."""
    while _HELD_LOCKS:
        _HELD_LOCKS.pop().close()


def check_output(out: Path, *, kind: str, overwrite: bool = False, model: Optional[str] = None,
                 inputs: Sequence[Path | str] = (), names: Optional[Sequence[str]] = None,
                 state: Sequence[str] = (), resume: bool = False, reuse: bool = False,
                 option: str = "--out") -> None:
    """Refuse an output location before any compute starts.

    Args:
        out: the output path.
        kind: "dir" (a folder the command fills) or "file".
        overwrite: `--overwrite` was given: existing output may be replaced.
        model: the input model argument; `out` must not be its folder.
        inputs: other inputs `out` must not be (the parts of a merge, a corpus).
        names: for a folder, the entries (globs) the command writes; None: the folder is the
            output as a whole, and any entry makes it taken.
        state: entries (globs) of an unfinished run that `--resume` continues.
        resume: `--resume` was given.
        reuse: the folder is a cache the command reads back (demo, study): its kind and
            writability are checked, and when it lacks curvedit's stamp (`stamp_output`) any
            existing entry matching `names` is a user's file, refused without `overwrite`.
        option: the option's name, for messages.

    Raises:
        CurveditError: `out` is a file where a folder is expected or the reverse, is the input
            model's folder or one of `inputs` (or inside an input folder), holds output without `overwrite` (or only an
            unfinished run without `resume`), cannot be written, or is being written by another
            run (the checks end by taking its lock, `lock_output`).
    """
    out = Path(out)
    if kind not in ("dir", "file"):
        raise ValueError(f"kind must be 'dir' or 'file', got {kind!r}")
    if model is not None and Path(model).exists() and _same_path(out, Path(model)):
        fail(f"refusing to write into the input model's directory {model} ({option}); give another folder")
    for given in inputs:
        if Path(given).exists() and _same_path(out, Path(given)):
            fail(f"{option} {out} is one of the inputs; give another path")
        if Path(given).is_dir() and Path(given).resolve() in Path(out).resolve().parents:
            fail(f"{option} {out} is inside the input folder {given}; give a path outside it")
    if kind == "dir" and out.exists() and not out.is_dir():
        fail(f"{option} {out} is a file; give a folder")
    if kind == "file" and out.is_dir():
        fail(f"{option} {out} is a folder; give a file path")
    if kind == "file" and out.exists() and not overwrite:
        fail(f"{out} exists; pass --overwrite to replace it")
    if kind == "dir" and out.is_dir() and reuse and not overwrite and not (out / OUTPUT_STAMP).exists():
        theirs = sorted(p.name for p in out.iterdir() if any(fnmatch.fnmatchcase(p.name, n) for n in names or ()))
        if theirs:
            fail(f"{out} holds {', '.join(theirs[:3])} that curvedit did not write there; pass --overwrite to "
                 "replace them, or give another folder")
    if kind == "dir" and out.is_dir() and not reuse:
        entries = sorted(p.name for p in out.iterdir() if not is_temporary(p))
        if names is not None:
            entries = [e for e in entries if any(fnmatch.fnmatchcase(e, n) for n in names)]
        unfinished = [e for e in entries if any(fnmatch.fnmatchcase(e, s) for s in state)]
        taken = [e for e in entries if e not in unfinished]
        if taken and not overwrite:
            shown = ", ".join(taken[:3]) + (", ..." if len(taken) > 3 else "")
            fail(f"{out} exists and is not empty ({shown}); pass --overwrite to replace it")
        if unfinished and not taken and not resume and not overwrite:
            fail(f"{out} holds an unfinished run ({', '.join(unfinished[:3])}); pass --resume to continue it")
    _check_writable(out, option)
    lock_output(out, option)
    if kind == "dir" and out.is_dir():  # a write killed half-way left these; they are ours to remove
        for leftover in out.iterdir():
            if is_temporary(leftover):
                leftover.unlink()


def read_windows(path: Path, loaded: Any) -> list:
    """Memorized windows for a loaded model: read (`read_memorized`), then checked against its
    vocabulary and context window (`check_windows`), so every command refuses the same inputs."""
    from curvedit.evaluate.generation import check_windows
    from curvedit.evaluate.windows import read_memorized

    windows = read_memorized(path, loaded.preprocessor)
    check_windows(loaded.model, windows, f"memorized windows of {path}")
    return windows
