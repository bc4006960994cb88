"""The package layout is layered: a module imports only from its own package or from layers below.

    foundation (errors, io, data, models, distributed, chartok, plots)
    kfac | evaluate            curvature; running and scoring a model
    editing | memorize         changing weights; adding memorization
    diagnostics                analyses built on edits
    experiments                the demo and the studies
    cli                        the command line
"""

from __future__ import annotations

import ast
from pathlib import Path

import curvedit

PACKAGE_ROOT = Path(curvedit.__file__).parent
FOUNDATION = {"errors", "io", "data", "models", "distributed", "chartok", "plots"}
LAYERS = {"kfac": 1, "evaluate": 1, "editing": 2, "memorize": 2, "diagnostics": 3, "experiments": 4, "cli": 5}


def _unit(module: str) -> str:
    """The layer unit of a dotted module name below `curvedit` ("" for the package root)."""
    parts = module.split(".")[1:]
    if not parts:
        return ""
    return "foundation" if parts[0] in FOUNDATION else parts[0]


def _rank(unit: str) -> int:
    return 0 if unit in ("", "foundation") else LAYERS[unit]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "curvedit":
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.split(".")[0] == "curvedit")
    return names


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE_ROOT.rglob("*.py"):
        parts = path.relative_to(PACKAGE_ROOT).with_suffix("").parts
        modules[".".join(("curvedit", *(parts[:-1] if parts[-1] == "__init__" else parts)))] = path
    return modules


def test_every_module_belongs_to_a_known_layer() -> None:
    units = {_unit(name) for name in _modules()}
    assert units <= {"", "foundation", *LAYERS}, units - {"", "foundation", *LAYERS}


def test_no_module_imports_upward_or_sideways() -> None:
    wrong = []
    for name, path in _modules().items():
        here = _unit(name)
        for imported in _imports(path):
            there = _unit(imported)
            if there == "" or there == here:
                continue
            if _rank(there) >= _rank(here):
                wrong.append(f"{name} imports {imported}")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_layer_check_sees_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "bad.py"
    module.write_text("from curvedit.editing.edit import EditPlan\n")
    assert _imports(module) == {"curvedit.editing.edit"}
    assert _rank(_unit("curvedit.editing.edit")) > _rank(_unit("curvedit.kfac.spectrum"))


def test_every_package_exports_what_its_all_names() -> None:
    import importlib

    for package in ("kfac", "editing", "evaluate", "diagnostics", "memorize", "experiments"):
        module = importlib.import_module(f"curvedit.{package}")
        for name in module.__all__:
            assert hasattr(module, name) or importlib.import_module(f"curvedit.{package}.{name}"), name


def test_no_package_export_hides_one_of_its_modules() -> None:
    """`import curvedit.evaluate.perplexity as m` must give the module, not a function of that name."""
    import importlib

    for package in ("kfac", "editing", "evaluate", "diagnostics", "memorize"):
        module = importlib.import_module(f"curvedit.{package}")
        submodules = {p.stem for p in (PACKAGE_ROOT / package).glob("*.py")}
        assert not set(module.__all__) & submodules, (package, set(module.__all__) & submodules)
