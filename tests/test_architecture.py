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


def imported_modules(path: Path, source: str | None = None) -> set[str]:
    """Every deltatune module a file imports, by dotted name, in any import form: ``import
    deltatune.methods.lora``, ``from deltatune.methods import lora``, ``from . import lora``,
    ``from .lora import X``. ``from M import a`` yields ``M`` and ``M.a`` (``a`` may be a module).
    ``source``: read this instead of the file's text, as if it were the file at ``path``."""
    package = ["deltatune", *path.relative_to(SRC).parts[:-1]]
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + (node.module.split(".") if node.module else []))
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
    return {m for m in found if m.startswith("deltatune.")}


METHOD_FILES = sorted(p for p in (SRC / "methods").glob("*.py") if p.name != "__init__.py")


def other_methods_imported(path: Path, source: str | None = None) -> set[str]:
    others = {f"deltatune.methods.{p.stem}" for p in METHOD_FILES} - {f"deltatune.methods.{path.stem}"}
    return {m for m in imported_modules(path, source) if any(m == o or m.startswith(o + ".") for o in others)}


@pytest.mark.parametrize("path", METHOD_FILES, ids=lambda p: p.name)
def test_no_method_imports_another(path):
    assert not other_methods_imported(path), f"methods/{path.name} imports {sorted(other_methods_imported(path))}"


@pytest.mark.parametrize("source", ["from . import lora", "from .lora import LoraDelta", "from . import ia3, lora",
                                    "import deltatune.methods.lora", "import deltatune.methods.lora as lora",
                                    "from deltatune.methods import lora", "from deltatune.methods.lora import X",
                                    "from ..methods import lora", "from ..methods.lora import X",
                                    "def f():\n    from .lora import X"])
def test_the_import_check_catches_every_import_form(source):
    ia3 = SRC / "methods" / "ia3.py"
    assert other_methods_imported(ia3, source) == {"deltatune.methods.lora"} | (
        {"deltatune.methods.lora.X"} if "X" in source else {"deltatune.methods.lora.LoraDelta"} if "Delta" in source
        else set())
    assert not other_methods_imported(ia3, "from ..core.method import Method\nfrom . import ia3")


def code_strings(path: Path) -> list[tuple[int, str]]:
    """String constants of a module's code, docstrings left out."""
    tree = ast.parse(path.read_text())
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node) is not None}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


#: registered method names that are also ordinary words of the engine's vocabulary
ENGLISH = {"layer", "prefix", "prompt", "adapter", "full"}


def identifiers(path: Path) -> list[tuple[int, str]]:
    """Every name a module defines or uses: variables, attributes, functions, classes, arguments."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        name = (node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute)
                else node.arg if isinstance(node, ast.arg)
                else node.name if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else None)
        if name:
            found.append((node.lineno, name))
    return found


def test_every_registered_method_has_a_case_row():
    from cases import CASES

    covered = {case.config(case.families[0]).method for case in CASES}
    assert set(dt.registered()) <= covered, f"no case row in tests/cases.py for {set(dt.registered()) - covered}"


@pytest.mark.parametrize("path", sorted([*(SRC / "core").glob("*.py"), *(SRC / "io").glob("*.py")]),
                         ids=lambda p: str(p.relative_to(SRC)))
def test_the_engine_and_the_file_formats_name_no_method(path):
    # "adapter" is also the word for any adapter file; the families are the engine's to declare.
    methods = set(dt.registered()) - {"adapter"} - set(FAMILIES)
    configs = {cls.config_class.__name__ for cls in dt.registered().values()}
    # Names that are no English word (lora, ia3, vera, bitfit) may not appear even inside a string
    # or a name (lora_A, "rslora"); the others (layer, prefix, prompt) only not as a whole string.
    coined = {m for m in methods if m not in ENGLISH}
    for line, text in code_strings(path):
        assert text.lower() not in methods, f"{path.name}:{line} names the method '{text}'"
        assert not [m for m in coined if m in text.lower()], f"{path.name}:{line} names a method in '{text}'"
    for line, name in identifiers(path):
        assert not [m for m in coined if m in name.lower()], f"{path.name}:{line} names a method in '{name}'"
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
