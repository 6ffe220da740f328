"""The layout's rules, checked on the source: imports run one way, methods stand alone, the
engine and the file formats name no method, functions stay short."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import deltatune as dt
from deltatune.core.method import FAMILIES

SRC = Path(dt.__file__).parent
#: a package may import only packages of a lower rank (and itself).
RANKS = {"version": 0, "env": 0, "core": 0, "hf": 1, "assets": 1, "methods": 2, "io": 3, "data": 4,
         "tasks": 5, "train": 6, "compare": 7, "search": 7, "serve": 7, "demo": 8, "cli": 9}


def package_of(path: Path) -> str:
    parts = path.relative_to(SRC).parts
    return parts[0] if len(parts) > 1 else path.stem


def imported_packages(path: Path) -> set[str]:
    """The deltatune packages a module imports (relative imports resolved)."""
    found = set()
    here = list(path.relative_to(SRC).parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            parts = here[:len(here) - node.level + 1] + (node.module.split(".") if node.module else [])
            found.add(parts[0] if parts else node.names[0].name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found.update(m.split(".")[1] for m in modules if m.startswith("deltatune."))
    return found


MODULES = sorted(p for p in SRC.rglob("*.py") if p.name != "__init__.py" or p.parent != SRC)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_run_one_way(path):
    package = package_of(path)
    for other in imported_packages(path) - {package}:
        assert other in RANKS, f"{path.name} imports '{other}', which has no place in the layering"
        assert RANKS[other] < RANKS[package], (f"{package}/{path.name} imports {other}: "
                                               f"imports run core <- hf <- methods <- io <- data/tasks <- "
                                               "train <- compare/search/serve <- cli")


@pytest.mark.parametrize("path", sorted((SRC / "methods").glob("*.py")), ids=lambda p: p.name)
def test_no_method_imports_another(path):
    methods = {p.stem for p in (SRC / "methods").glob("*.py")} - {"__init__"}
    here = list(path.relative_to(SRC).parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and path.name != "__init__.py":
            assert node.module not in methods, f"methods/{path.name} imports methods/{node.module}.py"
    assert here == ["methods"]


def code_strings(path: Path) -> list[tuple[int, str]]:
    """String constants of a module's code, docstrings left out."""
    tree = ast.parse(path.read_text())
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node) is not None}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


@pytest.mark.parametrize("path", sorted([*(SRC / "core").glob("*.py"), *(SRC / "io").glob("*.py")]),
                         ids=lambda p: str(p.relative_to(SRC)))
def test_the_engine_and_the_file_formats_name_no_method(path):
    # "adapter" is also the word for any adapter file; the families are the engine's to declare.
    methods = set(dt.registered()) - {"adapter"} - set(FAMILIES)
    configs = {cls.config_class.__name__ for cls in dt.registered().values()}
    for line, text in code_strings(path):
        assert text.lower() not in methods, f"{path.name}:{line} names the method '{text}'"
    names = {n.id for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Name)}
    assert not names & configs, f"{path.name} uses {names & configs}"
    if path != SRC / "io" / "__init__.py":  # which imports the methods package to register them all
        assert "methods" not in imported_packages(path)


def functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def test_no_function_is_longer_than_60_lines():
    long = [f"{p.relative_to(SRC)}:{line} {name} ({n} lines)" for p in MODULES for name, line, n in functions(p) if n > 60]
    assert not long


def test_one_version_number():
    import tomllib

    project = tomllib.loads((SRC.parent.parent / "pyproject.toml").read_text())["project"]
    assert project["version"] == dt.__version__
