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
