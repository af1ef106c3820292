"""The divergence table (additive proxy): per parameter and measured value, the divergence of
the policy with that parameter alone changed, per validation sample.

Cost saving: a change that starts at layer ``d`` leaves layers ``< d`` equal to the unpruned
run, so per sample the unpruned layer inputs are cached once
(:func:`dop.runtime.replay.capture_prefix`) and each entry runs layers ``d..L-1`` only
(:func:`~dop.runtime.replay.replay_from`). Entries starting at layer 0 (``n_v``) run the full
forward. Decoder-layer evaluations are counted against the naive count (every entry a full
forward, plus one unpruned forward per sample).

The table is checkpointed as it fills (JSON, temporary file + rename, per-sample values so a
resumed run recomputes nothing and reproduces the same numbers); a file made for another
search (model, samples, ranker, space, grid) is refused, naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..jsonio import write_json_atomic
from .divergence import PreparedSample, kl_divergence
from .spaces import Space

FORMAT = "dop-search-table/1"


class TableError(ValueError):
    """A table file is unreadable or belongs to another search."""


def samples_fingerprint(prepared: Sequence[PreparedSample]) -> str:
    h = hashlib.sha1()
    for s in prepared:
        h.update(s.inputs["input_ids"].numpy().tobytes())
        for k in sorted(s.inputs):
            v = s.inputs[k]
            if k != "input_ids" and isinstance(v, torch.Tensor):
                h.update(k.encode())
                h.update(v.detach().float().cpu().numpy().round(4).tobytes())
    return h.hexdigest()[:16]


@dataclass
class DivergenceTable:
    key: dict
    num_samples: int
    entries: dict[str, dict[int, list]] = field(default_factory=dict)  # param -> value -> per-sample KL
    layer_evals: int = 0
    naive_layer_evals: int = 0
    wall_s: float = 0.0

    @classmethod
    def empty(cls, key: dict, space: Space, num_samples: int) -> "DivergenceTable":
        t = cls(key, num_samples)
        t.entries = {p.name: {v: [None] * num_samples for v in p.measured} for p in space.params}
        return t

    # -- content ---------------------------------------------------------------------
    def get(self, name: str, value: int, sample: int):
        return self.entries[name][value][sample]

    def set(self, name: str, value: int, sample: int, kl: float) -> None:
        self.entries[name][value][sample] = float(kl)

    def missing(self) -> int:
        return sum(x is None for vals in self.entries.values() for per in vals.values() for x in per)

    def total(self) -> int:
        return sum(len(per) for vals in self.entries.values() for per in vals.values())

    @property
    def complete(self) -> bool:
        return self.missing() == 0

    def means(self, name: str) -> dict[int, float]:
        out = {}
        for v, per in self.entries[name].items():
            if any(x is None for x in per):
                raise TableError(f"table entry {name}={v} is incomplete")
            out[v] = sum(per) / len(per)
        return out

    def proxy(self, space: Space) -> dict[str, dict[int, float]]:
        """Proxy divergence of every candidate value of every parameter (interpolated)."""
        return {p.name: p.interpolate(self.means(p.name)) for p in space.params}

    # -- files -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "key": self.key,
            "num_samples": self.num_samples,
            "entries": {n: {str(v): per for v, per in vals.items()} for n, vals in self.entries.items()},
            "layer_evals": self.layer_evals,
            "naive_layer_evals": self.naive_layer_evals,
            "wall_s": self.wall_s,
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "table") -> "DivergenceTable":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise TableError(f"{where}: not a {FORMAT} file")
        try:
            entries = {n: {int(v): list(per) for v, per in vals.items()} for n, vals in d["entries"].items()}
            return cls(d["key"], int(d["num_samples"]), entries, int(d.get("layer_evals", 0)),
                       int(d.get("naive_layer_evals", 0)), float(d.get("wall_s", 0.0)))
        except (KeyError, TypeError, ValueError) as e:
            raise TableError(f"{where}: malformed table ({e})") from None

    def save(self, path: str) -> None:
        write_json_atomic(path, self.to_dict(), indent=1)

    @classmethod
    def load(cls, path: str) -> "DivergenceTable":
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as e:
            raise TableError(f"table file {path!r}: not valid JSON ({e.msg}, line {e.lineno})") from None
        return cls.from_dict(data, f"table file {path!r}")

    def check_key(self, key: dict, where: str = "table") -> None:
        diff = sorted(k for k in set(key) | set(self.key) if key.get(k) != self.key.get(k))
        if diff:
            shown = "; ".join(f"{k}: file has {self.key.get(k)!r}, this search {key.get(k)!r}" for k in diff[:4])
            raise TableError(f"{where} was made for another search ({shown}); use another --table path or delete it")


def build_table(
    model,
    prepared: Sequence[PreparedSample],
    space: Space,
    ranker,
    key: dict,
    *,
    table: DivergenceTable | None = None,
    path: str | None = None,
    naive: bool = False,
    progress: bool = True,
    checkpoint_s: float = 5.0,
    on_entry: Callable[[int], None] | None = None,
) -> DivergenceTable:
    """Fill (or finish) the divergence table. ``path``: load it if present (resume), save as it
    fills. ``naive=True`` runs every entry as a full forward (for tests and comparisons).
    ``on_entry(n_done)`` is called after each new entry."""
    from tqdm.auto import tqdm

    from ..models import get_adapter
    from ..runtime import apply_policy
    from ..runtime.replay import capture_prefix, capture_ranks, last_logits, replay_from

    n = len(prepared)
    if table is None and path and os.path.exists(path):
        table = DivergenceTable.load(path)
        table.check_key(key, f"table file {path!r}")
    if table is None:
        table = DivergenceTable.empty(key, space, n)
    else:
        table.check_key(key)
    L = get_adapter(model).num_layers
    params = list(space.params)
    ranker_layers = getattr(_resolved(ranker), "layers", ()) or ()
    probe_layers = min(max([0, *ranker_layers]) + 1, L - 1)
    missing = table.missing()
    bar = tqdm(total=table.total(), initial=table.total() - missing, desc="divergence table", unit="entry",
               disable=not progress, file=sys.stderr, leave=False)
    t0, last_save, done = time.perf_counter(), time.perf_counter(), 0
    wall0 = table.wall_s
    try:
        with torch.inference_mode():
            for i, s in enumerate(prepared):
                todo = [(p, v) for p in params for v in p.measured if table.get(p.name, v, i) is None]
                if not todo:
                    continue
                prefix = capture_prefix(model, s.inputs)
                table.layer_evals += L
                table.naive_layer_evals += L
                ranks = None
                for p, v in todo:
                    start = 0 if naive else p.start_layer(v)
                    if start > 0 and ranks is None:
                        ranks = capture_ranks(model, s.inputs, ranker)
                        table.layer_evals += probe_layers
                    policy = space.single(p.name, v)
                    with apply_policy(model, policy, ranker=ranker) as h:
                        if start == 0:
                            q = last_logits(model, s.inputs)
                        else:
                            q = replay_from(h, prefix, ranks, start)
                    table.layer_evals += L - start
                    table.naive_layer_evals += L
                    table.set(p.name, v, i, kl_divergence(prefix.logits, q))
                    done += 1
                    bar.update(1)
                    if on_entry is not None:
                        on_entry(done)
                    if path and time.perf_counter() - last_save > checkpoint_s:
                        table.wall_s = wall0 + time.perf_counter() - t0
                        table.save(path)
                        last_save = time.perf_counter()
    finally:
        bar.close()
        table.wall_s = wall0 + time.perf_counter() - t0
        if path:
            table.save(path)
    return table


def _resolved(ranker):
    from ..rankers import resolve_ranker

    return resolve_ranker(ranker)
