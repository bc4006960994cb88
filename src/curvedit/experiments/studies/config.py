"""A study as a configuration file: `curvedit study run study.toml`.

The file sets `StudyOptions` fields by name (the model, general text, canaries, implant
settings, capability families, layer grid, budget, probe floor, seeds, ...), with the implant
settings in an `[implant]` table and the edit settings (`EditSettings`: method, masses,
seed, dtypes, device) in an `[edit]` table; a field left out keeps the SmolLM2 study's default, so
`studies/smollm2/study.toml` reproduces `curvedit study smollm2`. Relative paths (`out`,
`gguf`, and `model` / `general` when they name something that exists) are taken from the
file's folder. Every stage stays cached by content, so changing, say, the probe families
reruns only what measures them.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

from curvedit.editing.settings import EditSettings
from curvedit.errors import CurveditError
from curvedit.experiments.studies.options import StudyError, StudyOptions
from curvedit.memorize.implant import ImplantOptions

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

_NOT_IN_FILES = {"progress", "config"}
_TABLES = {"implant": ImplantOptions, "edit": EditSettings}  # a StudyOptions field -> the dataclass of its table


def _tuple_fields() -> set[str]:
    return {f.name for f in fields(StudyOptions) if str(f.type).startswith("tuple")}


def _check_types(path: Path, data: dict[str, Any], types: dict[str, str], where: str = "") -> None:
    """Refuse a value of another type than its field's (an int where a number is expected is
    fine; "none" sets an optional field to None)."""
    for name, value in list(data.items()):
        kind = types[name]
        if "None" in kind and value == "none":
            data[name] = None
            continue
        ok = {"int": isinstance(value, int) and not isinstance(value, bool),
              "float": isinstance(value, (int, float)) and not isinstance(value, bool),
              "str": isinstance(value, str), "bool": isinstance(value, bool)}
        base = next((k for k in ("float", "int", "bool", "str") if kind.startswith(k)), None)
        if base is not None and not ok[base]:
            raise StudyError(f"{path}: {where}{name} must be {'an' if base == 'int' else 'a'} {base}, got {value!r}")


def load_study_config(path: str | Path) -> StudyOptions:
    """Read a study file into `StudyOptions` (validated).

    Args:
        path: a TOML file.

    Returns:
        The options, with `config` set to the file.

    Raises:
        StudyError: a missing or malformed file, an unknown field, or a setting
            `StudyOptions.validate` refuses.
    """
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file not found: {path}")
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise StudyError(f"{path}: not a valid TOML file ({err})") from None
    base = StudyOptions()
    tables = {name: data.pop(name, {}) for name in _TABLES}
    allowed = {f.name for f in fields(StudyOptions)} - _NOT_IN_FILES - set(_TABLES)
    if "compute_dtype" in data:
        raise StudyError(f"{path}: compute_dtype moved into the [edit] table: write `[edit]` and "
                         f"`compute_dtype = {data['compute_dtype']!r}` under it")
    unknown = sorted(set(data) - allowed) + [f"{name} (must be a table)" for name, table in tables.items()
                                             if not isinstance(table, dict)]
    if unknown:
        raise StudyError(f"{path}: unknown field(s) {unknown}; allowed: {sorted(allowed | set(_TABLES))}")
    _check_types(path, data, {f.name: str(f.type) for f in fields(StudyOptions)})
    nested = {}
    for name, kind in _TABLES.items():
        table_allowed = {f.name for f in fields(kind)}
        wrong = sorted(set(tables[name]) - table_allowed)
        if wrong:
            raise StudyError(f"{path}: unknown [{name}] field(s) {wrong}; allowed: {sorted(table_allowed)}")
        _check_types(path, tables[name], {f.name: str(f.type) for f in fields(kind)}, f"[{name}] ")
        nested[name] = asdict(getattr(base, name)) | tables[name]
    for name in _tuple_fields() & set(data):
        if not isinstance(data[name], list):
            raise StudyError(f"{path}: {name} must be a list, got {data[name]!r}")
        data[name] = tuple(data[name])
    folder = path.parent
    for name in ("out", "gguf"):
        if data.get(name) is not None:
            data[name] = folder / data[name] if not Path(data[name]).is_absolute() else Path(data[name])
    for name in ("model", "general"):
        if isinstance(data.get(name), str) and (folder / data[name]).exists():
            data[name] = str(folder / data[name])
    try:
        edit = EditSettings(**nested["edit"])
    except CurveditError as err:
        raise StudyError(f"{path}: [edit] {err}") from None
    options = replace(base, **data, implant=ImplantOptions(**nested["implant"]), edit=edit, config=path)
    options.validate()
    return options
