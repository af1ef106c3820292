"""The divergence table and its file (``"format": "dop-search-table/1"``, docs/design.md,
"Search"): per parameter and measured value, the divergence of the policy with that
parameter alone changed, per validation sample.

The table is checkpointed as it fills (JSON, temporary file + rename, per-sample values so a
resumed run recomputes nothing and reproduces the same numbers); a file made for another
search (model, samples, ranker, space, grid) is refused, naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ...jsonio import write_json_atomic
from ..divergence import PreparedSample
from ..robust import DEFAULT_AGGREGATE, aggregate
from ..spaces.base import Space

FORMAT = "dop-search-table/1"
COUNTERS = ("layer_evals", "naive_layer_evals", "token_layers", "naive_token_layers")


class TableError(ValueError):
    """A table file is unreadable or belongs to another search."""


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


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
    layer_evals: int = 0  # decoder-layer calls, per sample
    naive_layer_evals: int = 0
    token_layers: int = 0  # token rows through the MLP, summed over layers and candidates
    naive_token_layers: int = 0
    wall_s: float = 0.0
    # what each sample is (``PreparedSample.where``), to name outliers; optional in the file
    # (format 1 without it reads as before, and readers of before ignore it)
    sample_ids: list[str] | None = None

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

    def merge_values(self, other: "DivergenceTable") -> None:
        """Fill this table's missing entries from ``other`` (a table of the same search)."""
        for name, vals in other.entries.items():
            for v, per in vals.items():
                mine = self.entries[name][v]
                for i, x in enumerate(per):
                    if mine[i] is None and x is not None:
                        mine[i] = x

    def missing(self) -> int:
        return sum(x is None for vals in self.entries.values() for per in vals.values() for x in per)

    def total(self) -> int:
        return sum(len(per) for vals in self.entries.values() for per in vals.values())

    @property
    def complete(self) -> bool:
        return self.missing() == 0

    def means(self, name: str, how: str = DEFAULT_AGGREGATE) -> dict[int, float]:
        """Per measured value of ``name``, its per-sample divergences aggregated (``how``:
        :data:`~dop.search.robust.AGGREGATES`, the mean by default)."""
        out = {}
        for v, per in self.entries[name].items():
            if any(x is None for x in per):
                raise TableError(f"table entry {name}={v} is incomplete")
            out[v] = aggregate(per, how)
        return out

    def proxy(self, space: Space, how: str = DEFAULT_AGGREGATE) -> dict[str, dict[int, float]]:
        """Proxy divergence of every candidate value of every parameter (interpolated), each
        entry's samples aggregated by ``how`` (docs/design.md, "Robust aggregation")."""
        return {p.name: p.interpolate(self.means(p.name, how)) for p in space.params}

    # -- files -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "key": self.key,
            "num_samples": self.num_samples,
            "entries": {n: {str(v): per for v, per in vals.items()} for n, vals in self.entries.items()},
            **{name: getattr(self, name) for name in COUNTERS},
            "wall_s": self.wall_s,
            **({"sample_ids": list(self.sample_ids)} if self.sample_ids is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "table") -> "DivergenceTable":
        """Check every field's type (a hand-edited or foreign file fails here, naming the
        field, never later inside the solver)."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise TableError(f"{where}: not a {FORMAT} file")
        for name in ("key", "num_samples", "entries"):
            if name not in d:
                raise TableError(f"{where}: missing field {name!r}")
        key, n, raw = d["key"], d["num_samples"], d["entries"]
        if not isinstance(key, dict):
            raise TableError(f"{where}: 'key' must be an object, got {type(key).__name__}")
        if not is_int(n) or n < 1:
            raise TableError(f"{where}: 'num_samples' must be a positive integer, got {n!r}")
        if not isinstance(raw, dict):
            raise TableError(f"{where}: 'entries' must be an object, got {type(raw).__name__}")
        entries: dict[str, dict[int, list]] = {}
        for name, vals in raw.items():
            if not isinstance(vals, dict):
                raise TableError(f"{where}: entries.{name} must be an object of value -> per-sample list")
            entries[name] = {}
            for v, per in vals.items():
                try:
                    iv = int(v)
                except ValueError:
                    raise TableError(f"{where}: entries.{name}: value {v!r} is not an integer") from None
                if not isinstance(per, list) or len(per) != n:
                    raise TableError(f"{where}: entries.{name}.{v} must be a list of {n} per-sample "
                                     f"divergences, got {per!r}"[:300])
                for i, x in enumerate(per):
                    if x is not None and not (is_number(x) and x >= -1e-3):
                        raise TableError(f"{where}: entries.{name}.{v}[{i}] must be a divergence (a number >= 0) "
                                         f"or null, got {x!r}")
                entries[name][iv] = list(per)
        measured = key.get("measured")
        if isinstance(measured, dict):
            want = {str(p): sorted(int(v) for v in vs) for p, vs in measured.items()
                    if isinstance(vs, list) and all(is_int(v) for v in vs)}
            have = {p: sorted(vals) for p, vals in entries.items()}
            if want != have:
                raise TableError(f"{where}: the entries do not match the measured grid of its key "
                                 f"(key: {sorted(want)}, entries: {sorted(have)})")
        counters = {}
        for name, kind in (*((c, int) for c in COUNTERS), ("wall_s", float)):
            x = d.get(name, 0)
            if not is_number(x) or x < 0:
                raise TableError(f"{where}: {name!r} must be a non-negative number, got {x!r}")
            counters[name] = kind(x)
        ids = d.get("sample_ids")
        if ids is not None and (not isinstance(ids, list) or len(ids) != n or not all(isinstance(i, str) for i in ids)):
            raise TableError(f"{where}: 'sample_ids' must be a list of {n} strings, got {ids!r}"[:300])
        return cls(key, n, entries, **counters, sample_ids=ids)

    def save(self, path: str) -> None:
        write_json_atomic(path, self.to_dict(), indent=1)

    @classmethod
    def load(cls, path: str) -> "DivergenceTable":
        where = f"table file {path!r}"
        try:
            with open(path, "rb") as fh:
                data = json.loads(fh.read().decode("utf-8"))
        except UnicodeDecodeError:
            raise TableError(f"{where}: not UTF-8 JSON text") from None
        except json.JSONDecodeError as e:
            raise TableError(f"{where}: not valid JSON ({e.msg}, line {e.lineno})") from None
        except RecursionError:
            raise TableError(f"{where}: JSON nested too deeply") from None
        except IsADirectoryError:
            raise TableError(f"{where}: is a folder") from None
        return cls.from_dict(data, where)

    def check_key(self, key: dict, where: str = "table") -> None:
        diff = sorted(k for k in set(key) | set(self.key) if key.get(k) != self.key.get(k))
        if diff:
            shown = "; ".join(f"{k}: file has {self.key.get(k)!r}, this search {key.get(k)!r}" for k in diff[:4])
            raise TableError(f"{where} was made for another search ({shown}); use another --table path or delete it")
