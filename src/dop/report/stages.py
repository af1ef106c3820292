"""Resumable stages: each finished stage leaves a JSON file in ``<out>/stages/``; a rerun
with the same ``--out`` reuses it instead of recomputing."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from ..jsonio import _default, write_json_atomic


class Stages:
    """``stages.run(name, fn, key)`` returns ``fn()``'s JSON result, cached under ``name``.

    ``key`` (any JSON value) describes the inputs; a cached result made with another key
    is recomputed, so changing an option never silently reuses a stale stage."""

    def __init__(self, out_dir: str | os.PathLike, log: Callable[[str], None] = print):
        self.dir = Path(out_dir) / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.times: dict[str, float] = {}
        self.reused: list[str] = []

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def run(self, name: str, fn: Callable[[], Any], key: Any = None) -> Any:
        """Under several ranks (dop/distributed.py) rank 0's files decide for every rank, and
        only rank 0 writes them; ``fn`` runs on every rank (it shares its work)."""
        from .. import distributed as dd

        path = self.path(name)
        saved = None
        if path.exists() and dd.is_main():
            try:
                saved = json.loads(path.read_text())
            except json.JSONDecodeError:
                saved = None
            if saved is not None and saved.get("key") != _normal(key):
                saved = None
        saved = dd.broadcast(saved)
        if saved is not None:
            self.reused.append(name)
            self.times[name] = saved.get("seconds", 0.0)
            self.log(f"[{name}] reused from {path}")
            return saved["result"]
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
        self.times[name] = seconds
        if dd.is_main():
            write_json_atomic(path, {"key": _normal(key), "seconds": seconds, "result": result})
        return json.loads(json.dumps(result, default=_default))


def _normal(key: Any) -> Any:
    return json.loads(json.dumps(key, default=_default))
