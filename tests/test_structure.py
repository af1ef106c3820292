"""The code's layering (issue 15): the family adapters are the one seam to transformers'
internals, and the package's import graph has no cycle."""

from __future__ import annotations

import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "dop"


def _code_files():
    return sorted(p for p in SRC.rglob("*.py"))


def test_only_the_adapters_read_transformers_internals():
    pattern = re.compile(r"model_type|sys\.modules|_attn_implementation")
    found = [f"{p.relative_to(SRC)}:{i}: {line.strip()}"
             for p in _code_files() if p.parent.name != "models"
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The dop modules ``path`` imports, at module level or inside functions alike (a cycle
    kept working by function-local imports is still a cycle); a parent package is left out
    (Python imports it before any of its modules anyway)."""
    import ast

    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
            mod = ".".join([*base, node.module] if node.module else base) if node.level else node.module or ""
            targets = [mod, *(f"{mod}.{a.name}" for a in node.names)]
        else:
            continue
        for t in targets:
            while t not in modules and "." in t:
                t = t.rpartition(".")[0]
            if t in modules and t != name and not name.startswith(t + "."):
                out.add(t)
    return out


def test_the_import_graph_has_no_cycle():
    modules = {_module_name(p): p for p in _code_files()}
    graph = {m: _imports(p, set(modules)) for m, p in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m, path):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []
