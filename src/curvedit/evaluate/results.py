"""The results files of `curvedit evaluate`.

`results.json` holds one object:

    {"schema": "curvedit-evaluation/1",
     "config": {"name", "model", "reference", "curvedit_version", "created", "stress_test", "options"},
     "metrics": {
        "recitation": {SET: {"n", "strict", "loose", "avg_normalized_distance", "loose_threshold"}},
        "extraction": {SET: {"n", "exact_memorization", "extraction_strength",
                             ["samples", "sampled_extraction", "sample_probability"]}},
        "mia": {SET: {"members", "nonmembers", "k_percent",
                      "loss" | "zlib" | "min_k" | "min_k_plus_plus" | "reference": {"auroc"}}},
        "perplexity": {"perplexity", "tokens", "sequences"},
        "ndcg": {"ndcg@10", "positions", "gain", "definition"},
        "tasks": {TASK: {"accuracy", "n"}},
        "lm_eval": {TASK: {"acc,none", ...}},
        "stress": {SET: {"reference": {"n", "t", "include_original", "prompts", "mean_stress",
                                       "full_match", "mean_original", "improved"}}
                   or, with --stress filler,
                   {SET: {"original" | "left_extend_K" | "right_shift_K":
                          {"n", "skipped", "mean_prefix_match", "mean_prefix_fraction", "exact"}}}},
     "notes": [...],
     "details": "results.details.jsonl"}

Beside a metric `X`, `X_ci` holds its 95% interval: {"value", "low", "high", "n",
"method"} (Wilson for rates, bootstrap over examples or sequences for means and AUROCs).
Only the parts that were run are present. Per-example rows (one JSON object per line,
with a "metric" field: "recitation", "extraction" or "task") go to the side file named in "details".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from curvedit.errors import EvaluateError
from curvedit.evaluate.runner import Evaluation

SCHEMA = "curvedit-evaluation/1"
COUNT_KEYS = frozenset({"n", "tokens", "sequences", "positions", "skipped", "loose_threshold", "members",
                        "nonmembers", "k_percent", "t", "prompts", "samples"})
CI_SUFFIX = "_ci"


def details_path(path: str | Path) -> Path:
    """The per-example side file of a results file: `X.json` -> `X.details.jsonl`."""
    path = Path(path)
    return path.with_name(f"{path.stem}.details.jsonl")


def write_results(path: str | Path, evaluation: Evaluation, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write the results JSON and its per-example side file.

    Args:
        path: the results file (`.json`).
        evaluation: from `curvedit.evaluate.runner.evaluate_model`.
        overwrite: replace existing files.

    Returns:
        (results path, details path).

    Raises:
        FileExistsError: either file exists and `overwrite` is False.
    """
    path = Path(path)
    side = details_path(path)
    existing = [str(p) for p in (path, side) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} exist(s); pass overwrite (--overwrite) to replace")
    path.parent.mkdir(parents=True, exist_ok=True)
    with side.open("w", encoding="utf-8") as handle:
        for row in evaluation.details:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    document = {"schema": SCHEMA, "config": evaluation.config, "metrics": evaluation.metrics,
                "notes": evaluation.notes, "details": side.name}
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path, side


def read_results(path: str | Path) -> dict[str, Any]:
    """Read a results file written by `write_results`.

    Args:
        path: the results JSON.

    Returns:
        Its object.

    Raises:
        FileNotFoundError: the file does not exist.
        EvaluateError: not JSON, not a curvedit results file, or one without its metrics.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise EvaluateError(f"{path}: not valid JSON ({err.msg})") from None
    if not isinstance(document, dict) or document.get("schema") != SCHEMA:
        raise EvaluateError(f"{path}: not a curvedit results file (expected schema {SCHEMA!r})")
    if not isinstance(document.get("metrics"), dict):
        raise EvaluateError(f"{path}: a curvedit results file without its \"metrics\" object")
    return document


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten nested metrics into "a/b/c" -> value, keeping only scores.

    Counts and settings (n, tokens, sequences, positions, skipped, loose_threshold, ...),
    intervals (`*_ci`) and missing values (None) are left out; so is the perplexity's
    inner name (`perplexity/perplexity` becomes `perplexity`, `ndcg/ndcg@10` becomes `ndcg@10`).

    Args:
        metrics: the "metrics" object of a results file.
        prefix: key prefix (for recursion).

    Returns:
        An ordered dict of metric name -> float.
    """
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}" if prefix else key
        if key.endswith(CI_SUFFIX):
            continue
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, name))
        elif key not in COUNT_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[_collapse(name)] = float(value)
    return flat


def flatten_intervals(metrics: dict[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    """The intervals of nested metrics, named as `flatten_metrics` names their metrics.

    Args:
        metrics: the "metrics" object of a results file.
        prefix: key prefix (for recursion).

    Returns:
        Metric name -> its interval ({"value", "low", "high", "n", "method"}).
    """
    flat: dict[str, dict[str, Any]] = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}" if prefix else key
        if key.endswith(CI_SUFFIX) and isinstance(value, dict):
            flat[_collapse(name.removesuffix(CI_SUFFIX))] = value
        elif isinstance(value, dict):
            flat.update(flatten_intervals(value, name))
    return flat


def _collapse(name: str) -> str:
    head, _, tail = name.partition("/")
    return tail if tail and "/" not in tail and head in ("perplexity", "ndcg") else name
