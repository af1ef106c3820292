"""The import pattern of src/dop (issue 23), read from the source with ``ast``:

(a) the graph of module-level imports between dop's modules has no cycle;
(b) an import inside a function is only of a heavy or optional third-party package
    (:data:`DEFERRABLE`) and says why on its line (``# heavy: <why deferred>``); the two
    dispatch points that keep light entries light are the exceptions: ``dop.cli`` may import
    a command module when it runs it, and a package's PEP 562 ``__getattr__`` may import a
    submodule of its own for a lazy attribute (``import dop`` stays free of torch); both say
    ``# heavy:`` too. Only the modules of :data:`BY_NAME` import through ``importlib`` or
    ``__import__``, with ``# heavy:`` on the line: the cli dispatch, and ``dop.registry``,
    which discovers a package's entries by importing its files;
(c) no module reaches a private name (``_x``) of another dop module, by import or by
    attribute.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "dop"
# third-party packages whose import is deferred into the function that needs them: heavy to
# import (torch, transformers, matplotlib, PIL, numpy, scipy) or optional (extras, kernels)
DEFERRABLE = frozenset({
    "torch", "transformers", "matplotlib", "PIL", "numpy", "scipy",
    "datasets", "pyarrow", "lmms_eval", "accelerate", "vllm", "flash_attn", "flash_attn_interface",
})
HEAVY_TAG = "# heavy:"
DISPATCH_MODULE = "dop.cli"  # imports the command module it runs
# the modules that may import by name (importlib.import_module), and why
BY_NAME = {
    DISPATCH_MODULE: "imports the module of the command it runs, so that `dop --help` stays light",
    "dop.registry": "a registry tied to a package imports that package's files on first read: each file "
                    "registers its entry, so no list of entries is kept anywhere (docs/design.md)",
}
COMMANDS = "dop.commands"


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    line: int
    targets: tuple[str, ...]  # absolute names: modules, or module.attribute for `from m import a`
    names: tuple[str, ...]  # the names taken from the module (`from m import a, b`), else ()
    source: str  # the module the names come from (absolute)
    in_function: str | None  # the enclosing function's name, None at module level
    type_checking: bool  # inside `if TYPE_CHECKING:` (never executed)
    text: str  # the statement's lines


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def _absolute(path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    parts = package.split(".")
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path) -> list[Import]:
    """Every import statement of ``path``, with where it stands."""
    text = path.read_text()
    lines = text.splitlines()
    out: list[Import] = []

    def walk(node: ast.AST, function: str | None, type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                walk(child, function or child.name, type_checking)
                continue
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.body:
                    walk(ast.Module(body=[sub], type_ignores=[]), function, True)
                for sub in child.orelse:
                    walk(ast.Module(body=[sub], type_ignores=[]), function, type_checking)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                if isinstance(child, ast.Import):
                    source, names = "", ()
                    targets = tuple(a.name for a in child.names)
                else:
                    source = _absolute(path, child)
                    names = tuple(a.name for a in child.names)
                    targets = (source, *(f"{source}.{a}" for a in names))
                stmt = "\n".join(lines[child.lineno - 1: child.end_lineno])
                out.append(Import(module_name(path), child.lineno, targets, names, source, function,
                                  type_checking, stmt))
            walk(child, function, type_checking)

    walk(ast.parse(text), None, False)
    return out


def code_files() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def dop_modules() -> set[str]:
    return {module_name(p) for p in code_files()}


def resolve(target: str, modules: set[str]) -> str | None:
    """The dop module ``target`` names (a module, or an attribute of one), else None."""
    while target not in modules and "." in target:
        target = target.rpartition(".")[0]
    return target if target in modules else None


def module_graph(files: list[Path]) -> dict[str, set[str]]:
    """dop module -> the dop modules it imports at module level (its own ancestor packages
    left out: Python imports them before any of their modules anyway)."""
    modules = {module_name(p) for p in files}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for p in files:
        name = module_name(p)
        for imp in imports_of(p):
            if imp.in_function is not None or imp.type_checking:
                continue
            for t in imp.targets:
                m = resolve(t, modules)
                if m is not None and m != name and not name.startswith(m + "."):
                    graph[name].add(m)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """A cycle of ``graph`` as ``[m, ..., m]`` (``graphlib`` finds one), else []."""
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as e:
        return [e.args[1]]
    return []


def _gives_reason(line: str) -> bool:
    """``line`` carries ``# heavy: <why deferred>``."""
    return HEAVY_TAG in line and bool(line.split(HEAVY_TAG, 1)[1].strip())


def local_import_problems(path: Path, modules: set[str]) -> list[str]:
    """The function-local imports of ``path`` that break the pattern, one line each."""
    name = module_name(path)
    where = f"{path.relative_to(SRC.parent)}"
    problems = []
    for imp in imports_of(path):
        if imp.in_function is None or imp.type_checking:
            continue
        first = imp.text.splitlines()[0].strip()
        absolute = [imp.source] if imp.source else list(imp.targets)
        if any(t == "dop" or t.startswith("dop.") for t in absolute):
            # the dop modules it loads, less the importer and its packages (already loaded)
            loaded = {m for m in (resolve(t, modules) for t in imp.targets)
                      if m is not None and m != name and not name.startswith(m + ".")}
            dispatch = name == DISPATCH_MODULE and all(m.startswith(COMMANDS) for m in loaded)
            lazy_attribute = (path.name == "__init__.py" and imp.in_function == "__getattr__"
                              and bool(loaded) and all(m.startswith(name + ".") for m in loaded))
            if not (dispatch or lazy_attribute):
                problems.append(f"{where}:{imp.line}: dop-internal import inside {imp.in_function}() "
                                f"(move it to module level; fix a cycle by moving code): {first}")
                continue
        else:
            top = absolute[0].split(".")[0]
            if top not in DEFERRABLE:
                problems.append(f"{where}:{imp.line}: {top} is not a heavy or optional package "
                                f"(move the import to module level): {first}")
                continue
        if not any(_gives_reason(line) for line in imp.text.splitlines()):
            problems.append(f"{where}:{imp.line}: deferred import without '{HEAVY_TAG} <why deferred>': {first}")
    return problems


def dynamic_import_problems(path: Path) -> list[str]:
    """Imports by name (``importlib.import_module``, ``__import__``): only the modules of
    :data:`BY_NAME` may, with ``# heavy:`` on the call's line."""
    lines = path.read_text().splitlines()
    out = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, ast.Call):
            f = node.func
            called = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if called not in ("import_module", "__import__"):
                continue
            line = lines[node.lineno - 1]
            if module_name(path) not in BY_NAME:
                out.append(f"{path.relative_to(SRC.parent)}:{node.lineno}: import by name ({called}): {line.strip()}")
            elif not _gives_reason(line):
                out.append(f"{path.relative_to(SRC.parent)}:{node.lineno}: import by name without "
                           f"'{HEAVY_TAG} <why deferred>': {line.strip()}")
    return out


def private_problems(path: Path, modules: set[str]) -> list[str]:
    """Private names (``_x``, not dunder) of another dop module, imported or read as an attribute."""
    name = module_name(path)
    where = f"{path.relative_to(SRC.parent)}"

    def private(n: str) -> bool:
        return n.startswith("_") and not (n.startswith("__") and n.endswith("__"))

    problems = []
    bound: dict[str, str] = {}  # local name -> the dop module it is bound to
    for imp in imports_of(path):
        src = resolve(imp.source, modules) if imp.source else None
        for n in imp.names:
            sub = resolve(f"{imp.source}.{n}", modules)
            if sub is not None and sub == f"{imp.source}.{n}":
                bound[n] = sub  # `from pkg import module`
                if private(n):
                    problems.append(f"{where}:{imp.line}: imports private module {sub}")
            elif src is not None and src != name and private(n):
                problems.append(f"{where}:{imp.line}: imports private name {n} of {src}")
        if imp.source and resolve(imp.source, modules) not in (None, name) and any(
                private(part) for part in imp.source.split(".")):
            problems.append(f"{where}:{imp.line}: imports private module {imp.source}")
        if not imp.source:
            for t in imp.targets:
                m = resolve(t, modules)
                if m is not None and any(private(part) for part in t.split(".")):
                    problems.append(f"{where}:{imp.line}: imports private module {t}")
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in bound and bound[node.value.id] != name and private(node.attr)):
            problems.append(f"{where}:{node.lineno}: reads private {node.attr} of {bound[node.value.id]}")
    return problems


# ---------------------------------------------------------------------- the checks
def test_the_module_level_import_graph_has_no_cycle():
    assert cycles(module_graph(code_files())) == []


def test_function_local_imports_follow_the_pattern():
    modules = dop_modules()
    found = [p for f in code_files() for p in local_import_problems(f, modules) + dynamic_import_problems(f)]
    assert found == [], "\n" + "\n".join(found)


def test_no_module_reaches_another_modules_private_names():
    modules = dop_modules()
    found = [p for f in code_files() for p in private_problems(f, modules)]
    assert found == [], "\n" + "\n".join(found)


def test_dop_help_and_import_dop_load_no_heavy_package():
    code = ("import contextlib, io, sys\n"
            "import dop, dop.policy\n"
            "from dop.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try:\n"
            "        main(['--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "assert 'transfer' in out.getvalue(), out.getvalue()\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[1:])))\n")
    heavy = sorted(DEFERRABLE)
    run = subprocess.run([sys.executable, "-c", code, *heavy], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(SRC.parent), "PATH": ""})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


# ---------------------------------------------------------------------- the checker itself
def _write(root: Path, files: dict[str, str]) -> list[Path]:
    out = []
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        out.append(p)
    return out


@pytest.fixture
def fake_src(tmp_path, monkeypatch):
    """A throwaway ``dop`` tree the checks read instead of the real one."""
    root = tmp_path / "dop"
    monkeypatch.setattr(sys.modules[__name__], "SRC", root)
    return root


def test_the_checks_catch_each_kind_of_violation(fake_src):
    files = _write(fake_src, {
        "__init__.py": "def __getattr__(name):\n    from .a import f  # heavy: torch\n    return f\n",
        "a.py": "from .b import g\n\ndef f():\n    from ._c import h  # heavy: nothing\n    return h\n",
        "b.py": "from . import a\nfrom .a import _helper\n\ndef g():\n    import json\n    import torch\n"
                "    import numpy  # heavy: arrays\n    return a._secret\n",
        "_c.py": "import importlib\n\ndef h():\n    return importlib.import_module('dop.a')\n",
        "cli.py": "def main():\n    from .commands import run  # heavy: the command's packages\n",
        "registry.py": "import importlib\n\ndef load(p):\n    importlib.import_module(p)  # heavy: entries\n"
                       "    importlib.import_module(p + '.x')\n",
        "commands/__init__.py": "",
        "commands/run.py": "",
    })
    modules = dop_modules()
    (cycle,) = cycles(module_graph(files))
    assert cycle[0] == cycle[-1] and sorted(cycle[:-1]) == ["dop.a", "dop.b"]
    local = [p for f in files for p in local_import_problems(f, modules)]
    assert [p.split(": ")[0] for p in local] == ["dop/a.py:4", "dop/b.py:5", "dop/b.py:6"]
    assert "dop-internal" in local[0] and "json is not a heavy" in local[1] and "without '# heavy:" in local[2]
    assert [p.split(": ")[0] for f in files for p in dynamic_import_problems(f)] == ["dop/_c.py:4", "dop/registry.py:5"]
    private = sorted(p for f in files for p in private_problems(f, modules))
    assert private == ["dop/a.py:4: imports private module dop._c",
                       "dop/b.py:2: imports private name _helper of dop.a",
                       "dop/b.py:8: reads private _secret of dop.a"]


def test_type_checking_imports_and_own_private_names_pass(fake_src):
    files = _write(fake_src, {
        "__init__.py": "",
        "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n_x = 1\n"
                "def f():\n    return _x\n",
        "b.py": "from .a import f\nclass B:\n    pass\n",
    })
    modules = dop_modules()
    assert cycles(module_graph(files)) == []
    assert [p for f in files for p in local_import_problems(f, modules) + private_problems(f, modules)] == []
