"""The base of every error curvedit raises for input it cannot use.

Each module keeps its own error type (`DataError`, `FactorError`, `EditError`, ...); all of
them derive from `CurveditError`, so a caller can tell "the input is wrong" (catch
`CurveditError`: print the message, nothing else) from a bug (anything else: a traceback).
`CurveditError` is a `ValueError`, so code that catches `ValueError` keeps working; the types
that used to be `RuntimeError`s (`CollectError`, `EighError`, `DistributedError`) still are.
The command line prints a `CurveditError` as one line `error: ...` and exits with status 2.
"""

from __future__ import annotations


class CurveditError(ValueError):
    """Input (a file, a model, an option) that curvedit cannot use; the message says what and where."""


class EvaluateError(CurveditError):
    """An evaluation that cannot run as asked (bad options, nothing to evaluate, a bad results file)."""
