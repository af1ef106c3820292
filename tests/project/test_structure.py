"""The code's layering (issues 15 and 23): the family adapters (``dop/models``) are the one
seam to a model's modules, ``dop/compat.py`` the one place that reads transformers' and
torch's internals, and the packages import each other downwards only.

The source checks parse every file of ``src/dop`` (ast); the run-time check watches which dop
files read a submodule or parameter of a model while it prunes, ranks and replays."""

from __future__ import annotations

import ast
import contextlib
import functools
import sys
from pathlib import Path

import pytest
import torch

import dop
from dop.models import get_adapter
from dop.runtime.replay import capture_prefix, capture_ranks, replay_from
from tiny_models import build_inputs, build_model

SRC = Path(__file__).resolve().parents[2] / "src" / "dop"
SEAM = ("models", "serving")  # folders whose files read a model's modules: transformers' (models/)
# and vLLM's own classes (serving/, docs/serving.md), which the transformers adapters do not cover
COMPAT = "compat.py"

# modules of a transformers decoder layer and language model that only the adapters name
LAYER_PARTS = {
    "self_attn", "q_proj", "k_proj", "v_proj", "o_proj", "input_layernorm", "post_attention_layernorm",
    "rotary_emb", "embed_tokens", "language_model", "vision_tower", "multi_modal_projector",
    "get_output_embeddings", "get_input_embeddings", "get_decoder", "get_image_features",
}
# internals transformers does not promise, with no underscore to tell them
INTERNAL_NAMES = {"cumulative_length", "max_cache_len", "_attn_implementation", "model_type"}

# which dop packages each package of the seam may import (the rest: anything below them)
MAY_IMPORT = {
    "compat": set(),
    "models": {"compat"},
    "rankers": {"compat", "models", "policy"},
    "runtime": {"compat", "models", "names", "policy", "rankers"},
}
# packages the policy and the FLOPs count (what every layer reads) must not import
ABOVE_POLICY = {"runtime", "rankers", "search", "evaluate", "pipeline", "commands", "report", "lmms", "cli"}


def _code_files():
    return sorted(SRC.rglob("*.py"))


def _rel(path: Path) -> str:
    return str(path.relative_to(SRC))


def _in_seam(path: Path) -> bool:
    return path.relative_to(SRC).parts[0] in SEAM


@functools.cache
def _parsed() -> dict:
    return {p: ast.parse(p.read_text()) for p in _code_files()}


def _trees() -> dict:
    """Every source file's syntax tree (parsed once; callers may replace entries of the copy)."""
    return dict(_parsed())


def _defined_names(trees) -> set[str]:
    """Every name dop defines itself: functions, classes, assigned names and attributes."""
    out = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                out.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                out.add(node.attr)
            elif isinstance(node, ast.arg):
                out.add(node.arg)
    return out


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def find_seam_leaks(trees) -> list[str]:
    """Attribute reads of a decoder layer's or language model's modules outside the adapters."""
    return [f"{_rel(p)}:{n.lineno}: .{n.attr}" for p, tree in trees.items() if not _in_seam(p)
            for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in LAYER_PARTS]


def _annotations(tree) -> set[int]:
    """ids of the nodes inside annotations (they never run: ``from __future__ import annotations``)."""
    out = set()
    for node in ast.walk(tree):
        notes = []
        if isinstance(node, ast.arg):
            notes = [node.annotation]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            notes = [node.returns]
        elif isinstance(node, ast.AnnAssign):
            notes = [node.annotation]
        out |= {id(n) for note in notes if note is not None for n in ast.walk(note)}
    return out


def _read_names(node) -> list[str]:
    """The attribute names ``node`` reads: ``x.name``, or ``getattr(x, "name")`` and the like."""
    if isinstance(node, ast.Attribute):
        return [node.attr]
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) >= 2
            and node.func.id in ("getattr", "hasattr", "setattr", "delattr")
            and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
        return [node.args[1].value]
    return []


def find_internals(trees) -> list[str]:
    """Reads of other libraries' internals outside compat.py: a private name dop does not define
    (as an attribute, by ``getattr``, or imported), an internal listed in INTERNAL_NAMES
    (``model_type`` is the adapters' too), ``sys.modules``."""
    own = _defined_names(trees)
    found = []
    for p, tree in trees.items():
        if _rel(p) == COMPAT:
            continue
        notes = _annotations(tree)
        for n in ast.walk(tree):
            if id(n) in notes:
                continue
            for name in _read_names(n):
                if name == "model_type" and _in_seam(p):
                    continue
                if (_private(name) and name not in own) or name in INTERNAL_NAMES or (
                        name == "modules" and isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                        and n.value.id == "sys"):
                    found.append(f"{_rel(p)}:{n.lineno}: .{name}")
            if isinstance(n, ast.ImportFrom) and not n.level and not (n.module or "").startswith("dop"):
                found += [f"{_rel(p)}:{n.lineno}: import {a.name}" for a in n.names if _private(a.name)]
    return found


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def _imports(path: Path, tree, modules: set[str]) -> set[str]:
    """The dop modules ``path`` imports, at module level or inside functions alike (a cycle
    kept working by function-local imports is still a cycle); a parent package is left out
    (Python imports it before any of its modules anyway)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
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


def _graph(trees) -> dict[str, set[str]]:
    modules = {_module_name(p) for p in trees}
    return {_module_name(p): _imports(p, tree, modules) for p, tree in trees.items()}


def _package(module: str) -> str:
    """``dop.runtime.layer`` -> ``runtime``; ``dop.policy`` -> ``policy``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def find_layering_breaks(graph) -> list[str]:
    found = []
    for m, deps in sorted(graph.items()):
        pkg = _package(m)
        for d in sorted(deps):
            dp = _package(d)
            if dp in ("", pkg):
                continue
            if (pkg in MAY_IMPORT and dp not in MAY_IMPORT[pkg]) or (pkg in ("policy", "flops") and dp in ABOVE_POLICY):
                found.append(f"{m} imports {d}")
    return found


def find_cycles(graph) -> list[list[str]]:
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
    return cycles


# ---------------------------------------------------------------------- the source checks
def test_only_the_adapters_name_a_layers_modules():
    assert find_seam_leaks(_trees()) == []


def test_only_compat_reads_other_libraries_internals():
    assert find_internals(_trees()) == []


def test_packages_import_downwards_only():
    assert find_layering_breaks(_graph(_trees())) == []


def test_the_import_graph_has_no_cycle():
    assert find_cycles(_graph(_trees())) == []


VIOLATIONS = [  # (file, added source, the check that must catch it)
    ("runtime/layer.py", "def leak(layer):\n    return layer.self_attn.q_proj\n", find_seam_leaks),
    ("rankers/dart.py", "def leak(adapter, h):\n    return adapter.language_model().norm(h)\n", find_seam_leaks),
    ("runtime/layer.py", "def peek(attn):\n    return attn._forward_hooks\n", find_internals),
    ("runtime/session.py", "def peek(cache):\n    return cache.layers[0].cumulative_length\n", find_internals),
    ("rankers/common.py", "from transformers.utils.output_capturing import _active_collector\n", find_internals),
    ("search/api.py", "import sys\nm = sys.modules['x']\n", find_internals),
    ("names.py", "def peek(config):\n    return getattr(config, '_name_or_path', None)\n", find_internals),
    ("runtime/session.py", "from ..search import api\n", lambda t: find_layering_breaks(_graph(t))),
    ("models/base.py", "from ..runtime import apply_policy\n", lambda t: find_layering_breaks(_graph(t))),
    ("models/prefix.py", "from ..runtime import session\n", lambda t: find_cycles(_graph(t))),
]


@pytest.mark.parametrize("rel,added,check", VIOLATIONS, ids=[f"{v[0]}:{i}" for i, v in enumerate(VIOLATIONS)])
def test_each_check_catches_a_violation(rel, added, check):
    trees = _trees()
    path = SRC / rel
    trees[path] = ast.parse(path.read_text() + "\n" + added)
    assert check(trees) != []


# ---------------------------------------------------------------------- the run-time check
@contextlib.contextmanager
def submodule_reads():
    """Record every read of a submodule, parameter or buffer (what ``nn.Module.__getattr__``
    serves) made directly by a dop file outside the adapters."""
    found: list[str] = []
    original = torch.nn.Module.__getattr__
    root = str(SRC)

    def spy(self, name):
        frame = sys._getframe(1)
        where = frame.f_code.co_filename
        if where.startswith(root) and not _in_seam(Path(where)):
            found.append(f"{Path(where).relative_to(SRC)}:{frame.f_lineno}: .{name}")
        return original(self, name)

    torch.nn.Module.__getattr__ = spy
    try:
        yield found
    finally:
        torch.nn.Module.__getattr__ = original


@pytest.mark.parametrize("fam,ranker", [("llava", "dart"), ("qwen2_5_vl", "pdrop"), ("llava_next", "vispruner")])
@torch.no_grad()
def test_runtime_and_rankers_read_modules_only_through_the_adapter(fam, ranker):
    model = build_model(fam, attn="eager")
    inputs, _ = build_inputs(model, fam)
    L = get_adapter(model).num_layers
    policy = dop.Policy(L, [0.5, 1.0], {"attn_q": [L, 3], "attn_kv": [L, 3], "mlp": [L, 3]})
    with submodule_reads() as found:
        prefix = capture_prefix(model, inputs)
        ranks = capture_ranks(model, inputs, ranker, [0.5, 1.0])
        with dop.apply_policy(model, policy, ranker=ranker) as handle:
            model(**inputs, output_attentions=True)
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
            replay_from(handle, prefix, ranks, start=3)
        dop.rank_visual_tokens(model, inputs, ranker, n_keep=4)
    assert found == []
