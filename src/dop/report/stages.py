"""Resumable stages: each finished stage leaves a JSON file in ``<out>/stages/``; a rerun
with the same ``--out`` reuses it instead of recomputing."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from .. import distributed as dd
from ..jsonio import json_default, write_json_atomic


class Stages:
    """``stages.run(name, fn, key)`` returns ``fn()``'s JSON result, cached under ``name``.

    ``key`` (any JSON value) describes the inputs; a cached result made with another key
    is recomputed, so changing an option never silently reuses a stale stage."""

    def __init__(self, out_dir: str | os.PathLike, log: Callable[[str], None] = print, total: int | None = None):
        self.dir = Path(out_dir) / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.times: dict[str, float] = {}
        self.reused: list[str] = []
        self.total = total  # stages of the whole job, for "stage k of N" (may be revised)
        self.t0 = time.perf_counter()
        self._computed: dict[str, float] = {}  # seconds of the stages computed (not reused) so far
        self.expected: dict[str, int] = {}  # stages of each kind the job will run (for the estimate)
        self.done = 0  # stages finished (computed or reused)

    def progress(self, name: str) -> str:
        """``stage k of N`` with the time so far and, once a stage was computed, an estimate
        of the time left: each stage left costs the mean of the computed stages of its kind
        (the name's first word: ``search``, ``eval``), else of all computed stages."""
        self.done += 1
        k = self.done
        text = f"stage {k} of {self.total}" if self.total else f"stage {k}"
        text += f" ({name}) done; {_dur(time.perf_counter() - self.t0)} so far"
        if self.total and self._computed and self.total > k:
            left = self.total - k
            overall = sum(self._computed.values()) / len(self._computed)
            if self.expected:
                by_kind: dict[str, list[float]] = {}
                for n, secs in self._computed.items():
                    by_kind.setdefault(_kind(n), []).append(secs)
                finished = {}
                for n in self.times:
                    finished[_kind(n)] = finished.get(_kind(n), 0) + 1
                est, unknown = 0.0, []
                for kind, count in self.expected.items():
                    todo, times = max(0, count - finished.get(kind, 0)), by_kind.get(kind)
                    if todo and not times:
                        unknown.append(kind)  # no stage of this kind timed yet: no guess
                    elif todo:
                        est += todo * sum(times) / len(times)
                if unknown:
                    return text + f"; time left known after the first {' and '.join(unknown)} stage"
            else:
                est = left * overall
            text += f", about {_dur(est)} left"
        return text

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def run(self, name: str, fn: Callable[[], Any], key: Any = None) -> Any:
        """Under several ranks (dop/distributed.py) rank 0's files decide for every rank, and
        only rank 0 writes them; ``fn`` runs on every rank (it shares its work)."""
        path = self.path(name)
        saved = None
        if path.exists() and dd.is_main():
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, RecursionError):  # damaged or foreign: recompute
                saved = None
            if not (isinstance(saved, dict) and "result" in saved and saved.get("key") == _normal(key)):
                saved = None
        saved = dd.broadcast(saved)
        if saved is not None:
            self.reused.append(name)
            self.times[name] = saved.get("seconds", 0.0)
            self.log(f"[{name}] reused from {path}")
            self.log(f"[progress] {self.progress(name)}")
            return saved["result"]
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
        self.times[name] = seconds
        self._computed[name] = seconds
        if dd.is_main():
            write_json_atomic(path, {"key": _normal(key), "seconds": seconds, "result": result})
        self.log(f"[progress] {self.progress(name)}")
        return json.loads(json.dumps(result, default=json_default))


def _kind(name: str) -> str:
    return name.split("-", 1)[0]


def _dur(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def _normal(key: Any) -> Any:
    return json.loads(json.dumps(key, default=json_default))
