"""Comparison report over several results files: Markdown, HTML and bar charts.

Each results file is one run (named by its config "name", else its file stem). One run
is the reference (the first, or the one named): for every other run and metric the
report gives the retention, 100 * value / reference value. Retention reads "share of
the reference score" for scores where higher is better; for perplexity and the
average normalized distance a value above 100% means higher (worse perplexity, less
memorization).

Every value with an interval in its results file is shown as `value [low, high]`; a cell
marked `≈` is a run whose interval overlaps the reference's, so the difference between
them is not clear at 95%. Bar charts draw the intervals as error bars, and put a metric
on a log axis when its values span more than 3x.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from curvedit.errors import EvaluateError
from curvedit.evaluate.intervals import Interval
from curvedit.evaluate.results import flatten_intervals, flatten_metrics, read_results
from curvedit.plots import pyplot, save_figure, spans


@dataclass(frozen=True)
class ReportOptions:
    """How the report is built.

    Attributes:
        reference_name: the run to compare against (default: the first file's run).
        overwrite: replace existing report files.
    """

    reference_name: str | None = None
    overwrite: bool = False

    def validate(self) -> None:
        """Raise EvaluateError for an empty reference name (None means the first run)."""
        if self.reference_name is not None and not self.reference_name.strip():
            raise EvaluateError("the reference run's name is empty; give a run name or none (the first file's run)")


@dataclass(frozen=True)
class Run:
    """One results file in the report.

    Attributes:
        name: the run's name.
        path: its results file.
        metrics: its flattened metrics.
        intervals: the metrics' intervals, where the results file has them.
    """

    name: str
    path: Path
    metrics: dict[str, float]
    intervals: dict[str, dict] = field(default_factory=dict)


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Read results files as runs; a name used twice gets the file stem appended.

    Args:
        paths: results JSON files.

    Returns:
        The runs, in the given order.

    Raises:
        EvaluateError: no file, or a file that is not a curvedit results file.
        FileNotFoundError: a missing file.
    """
    if not paths:
        raise EvaluateError("give at least one results file")
    documents = [(Path(p), read_results(p)) for p in paths]
    names = [doc["config"].get("name") or path.stem for path, doc in documents]
    runs = []
    for (path, doc), name in zip(documents, names):
        unique = name if names.count(name) == 1 else f"{name} ({path.stem})"
        runs.append(Run(unique, path, flatten_metrics(doc["metrics"]), flatten_intervals(doc["metrics"])))
    if len({run.name for run in runs}) != len(runs):
        raise EvaluateError("two results files have the same run name and file stem; rename one")
    return runs


def retention(value: float | None, reference: float | None) -> float | None:
    """100 * value / reference; None when either is missing or the reference is 0."""
    if value is None or reference is None or reference == 0:
        return None
    return 100.0 * value / reference


def _fmt(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}%" if percent else f"{value:.4g}"


def _cell(run: Run, metric: str, reference: Run) -> str:
    """`value [low, high]`, marked ≈ when the interval overlaps the reference's."""
    value = run.metrics.get(metric)
    interval = run.intervals.get(metric)
    if value is None or interval is None:
        return _fmt(value)
    text = f"{_fmt(value)} [{_fmt(interval['low'])}, {_fmt(interval['high'])}]"
    other = reference.intervals.get(metric)
    if run is not reference and other is not None and Interval(**interval).overlaps(Interval(**other)):
        text += " ≈"
    return text


def _metric_names(runs: Sequence[Run]) -> list[str]:
    return list(dict.fromkeys(name for run in runs for name in run.metrics))


def _families(metrics: Sequence[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for metric in metrics:
        groups.setdefault(metric.split("/", 1)[0].split("@", 1)[0], []).append(metric)
    return groups


def _tables(runs: Sequence[Run], reference: Run) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    metrics = _metric_names(runs)
    others = [run for run in runs if run is not reference]
    value_header = ["metric", *(run.name for run in runs)]
    value_rows = [[m, *(_cell(run, m, reference) for run in runs)] for m in metrics]
    keep_header = ["metric", *(run.name for run in others)]
    keep_rows = [[m, *(_fmt(retention(run.metrics.get(m), reference.metrics.get(m)), percent=True) for run in others)]
                 for m in metrics]
    return value_header, value_rows, keep_header, keep_rows


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *(line(r) for r in rows)])


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _bar_chart(path: Path, family: str, metrics: list[str], runs: Sequence[Run]) -> None:
    """One subplot per metric (each on its own scale), one bar per run."""
    plt = pyplot()

    cols = min(len(metrics), 4)
    rows = (len(metrics) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols + 0.4 * len(runs), 2.8 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes.flat, metrics):
        values = [run.metrics.get(metric, float("nan")) for run in runs]
        bounds = [run.intervals.get(metric) for run in runs]
        errors = [[v - b["low"] if b else 0.0 for v, b in zip(values, bounds)],
                  [b["high"] - v if b else 0.0 for v, b in zip(values, bounds)]]
        bars = ax.bar(range(len(runs)), values, color=[colors[i % len(colors)] for i in range(len(runs))],
                      yerr=errors if any(bounds) else None, capsize=3, error_kw={"lw": 0.8})
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        present = [v for v in values if not math.isnan(v)]
        highs = [b["high"] for b in bounds if b] + present
        if spans(present, 3.0):
            ax.set_yscale("log")
        elif present and min(present) >= 0:
            ax.set_ylim(0, 1.15 * max(highs) if max(highs) > 0 else 1)
        ax.set_title(metric.removeprefix(f"{family}/") or metric, fontsize=9)
        ax.set_xticks(range(len(runs)), [run.name for run in runs], rotation=30, ha="right", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    fig.suptitle(family)
    fig.tight_layout()
    save_figure(fig, path)


def build_report(paths: Sequence[str | Path], out_dir: str | Path, options: ReportOptions | None = None) -> list[Path]:
    """Write `report.md`, `report.html` and one bar chart per metric family into `out_dir`.

    Args:
        paths: results JSON files; each is one run.
        out_dir: the report folder (created if missing).
        options: reference run and overwrite.

    Returns:
        The files written.

    Raises:
        EvaluateError: no file, an unknown reference name, or no metric in any file.
        FileExistsError: a report file exists and `overwrite` is False.
    """
    options = options or ReportOptions()
    options.validate()
    runs = load_runs(paths)
    names = [run.name for run in runs]
    if options.reference_name is not None and options.reference_name not in names:
        raise EvaluateError(f"no run named {options.reference_name!r}; runs: {names}")
    reference = runs[names.index(options.reference_name)] if options.reference_name else runs[0]
    metrics = _metric_names(runs)
    if not metrics:
        raise EvaluateError("the results files hold no metric")
    families = _families(metrics)
    out = Path(out_dir)
    charts = {family: out / f"{family}.png" for family in families}
    targets = [out / "report.md", out / "report.html", *charts.values()]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not options.overwrite:
        raise FileExistsError(f"report file(s) exist: {', '.join(existing)}; pass overwrite (--overwrite) to replace")
    out.mkdir(parents=True, exist_ok=True)
    for family, chart in charts.items():
        _bar_chart(chart, family, families[family], runs)
    value_header, value_rows, keep_header, keep_rows = _tables(runs, reference)
    sources = ", ".join(f"{run.name} = `{run.path}`" for run in runs)
    markdown = [
        "# curvedit evaluation report", "", f"Runs: {sources}.", f"Reference: **{reference.name}**.", "",
        "## Metrics", "", "Values with an interval show its 95% range; ≈ marks a run whose interval overlaps the "
        f"reference's ({reference.name}): the difference is not clear.", "",
        _markdown_table(value_header, value_rows), ""]
    if len(runs) > 1:
        markdown += ["## Retention (% of the reference)", "", _markdown_table(keep_header, keep_rows), ""]
    markdown += ["## Charts", "", *(f"![{family}]({chart.name})" for family, chart in charts.items()), ""]
    (out / "report.md").write_text("\n".join(markdown), encoding="utf-8")
    page = [
        "<!doctype html><html><head><meta charset='utf-8'><title>curvedit evaluation report</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
        "img{max-width:100%}</style></head><body>",
        "<h1>curvedit evaluation report</h1>",
        f"<p>Runs: {html.escape(sources)}.</p><p>Reference: <b>{html.escape(reference.name)}</b>.</p>",
        "<h2>Metrics</h2>", _html_table(value_header, value_rows)]
    if len(runs) > 1:
        page += ["<h2>Retention (% of the reference)</h2>", _html_table(keep_header, keep_rows)]
    page += ["<h2>Charts</h2>", *(f"<p><img src='{html.escape(c.name)}' alt='{html.escape(f)}'></p>"
                                  for f, c in charts.items()), "</body></html>"]
    (out / "report.html").write_text("\n".join(page), encoding="utf-8")
    return targets
