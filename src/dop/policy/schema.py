"""The fields of a policy and their checks (docs/design.md, "Policies", "Per-layer skips").

Each check names the offending field in its :class:`~dop.policy.errors.PolicyError` and
returns the field's normalised, read-only form.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from .errors import PolicyError

OP_KINDS = ("attn_q", "attn_kv", "mlp")
KEYS = ("attn", "attn_q", "attn_kv", "mlp")
MAX_LAYERS = 4096


def is_int(x: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_num_layers(num_layers: Any) -> None:
    if not is_int(num_layers) or not 1 <= num_layers <= MAX_LAYERS:
        raise PolicyError(f"num_layers: must be a positive integer (at most {MAX_LAYERS}), got {num_layers!r}")


def checked_groups(groups: Any) -> tuple[float, ...]:
    if not isinstance(groups, (list, tuple)) or len(groups) == 0:
        raise PolicyError(f"groups: must be a non-empty list of fractions, got {groups!r}")
    prev = 0.0
    for i, f in enumerate(groups):
        if not is_number(f):
            raise PolicyError(f"groups[{i}]: must be a number, got {f!r}")
        if not (0.0 < f <= 1.0):
            raise PolicyError(f"groups[{i}]: fractions must lie in (0, 1], got {f!r}")
        if f <= prev:
            raise PolicyError(f"groups: must be strictly increasing, got {list(groups)!r}")
        prev = f
    if groups[-1] != 1.0:
        raise PolicyError(f"groups: the last fraction must be 1.0, got {groups[-1]!r}")
    return tuple(float(f) for f in groups)


def check_kinds(table: Any, name: str) -> None:
    """``table`` (``depth`` or ``skip``) maps known op kinds, ``attn`` not beside its parts."""
    if not isinstance(table, Mapping):
        raise PolicyError(f"{name}: must be an object mapping op kinds to lists, got {table!r}")
    for k in table:
        if k not in KEYS:
            raise PolicyError(f"{name}: unknown op kind {k!r}; known kinds are {', '.join(KEYS)}")
    if "attn" in table and ("attn_q" in table or "attn_kv" in table):
        raise PolicyError(f"{name}: 'attn' may not be combined with 'attn_q' or 'attn_kv'")


def checked_depth(depth: Any, n_groups: int, num_layers: int) -> Mapping[str, tuple[int, ...]]:
    check_kinds(depth, "depth")
    out = {}
    for k, ds in depth.items():
        if not isinstance(ds, (list, tuple)):
            raise PolicyError(f"depth.{k}: must be a list of integers, got {ds!r}")
        if len(ds) != n_groups:
            raise PolicyError(f"depth.{k}: needs one depth per group ({n_groups}), got {len(ds)}")
        for g, d in enumerate(ds):
            if not is_int(d):
                raise PolicyError(f"depth.{k}[{g}]: must be an integer, got {d!r}")
            if not (0 <= d <= num_layers):
                raise PolicyError(f"depth.{k}[{g}]: must lie in [0, num_layers={num_layers}], got {d}")
        out[k] = tuple(int(d) for d in ds)
    return MappingProxyType(out)


def primitive_depth(depth: Mapping[str, tuple[int, ...]], kind: str, g: int, num_layers: int) -> int:
    """Group ``g``'s depth for a primitive op kind: its own entry, else ``attn`` standing for
    ``attn_q`` and ``attn_kv`` together, else every layer (the one home of that fallback)."""
    if kind in depth:
        return depth[kind][g]
    if kind in ("attn_q", "attn_kv") and "attn" in depth:
        return depth["attn"][g]
    return num_layers


def _effective_depth(depth: Mapping[str, tuple[int, ...]], kind: str, g: int, num_layers: int) -> int:
    """The depth below which a skip of ``kind`` (``attn`` included) for group ``g`` changes anything."""
    if kind == "attn":
        return max(primitive_depth(depth, k, g, num_layers) for k in ("attn_q", "attn_kv"))
    return primitive_depth(depth, kind, g, num_layers)


def _checked_layers(layers: Any, where: str, num_layers: int) -> list[int]:
    if not isinstance(layers, (list, tuple)):
        raise PolicyError(f"{where}: must be a list of layer indices, got {layers!r}")
    if len(layers) > num_layers:
        raise PolicyError(f"{where}: lists {len(layers)} layers, more than num_layers={num_layers}")
    for i, l in enumerate(layers):
        if not is_int(l):
            raise PolicyError(f"{where}[{i}]: must be an integer, got {l!r}")
        if not (0 <= l < num_layers):
            raise PolicyError(f"{where}[{i}]: must lie in [0, num_layers={num_layers}), got {l}")
    if len(set(layers)) != len(layers):
        dup = sorted({l for l in layers if layers.count(l) > 1})
        raise PolicyError(f"{where}: layer(s) {dup} listed twice")
    return [int(l) for l in layers]


def checked_skip(skip: Any, depth: Mapping[str, tuple[int, ...]], n_groups: int,
                 num_layers: int) -> Mapping[str, tuple[tuple[int, ...], ...]]:
    """Validate ``skip`` and return its canonical form (docs/design.md, "Per-layer skips"):
    sorted layers, entries at or beyond the kind's depth dropped, kinds left empty dropped."""
    skip = {} if skip is None else skip
    check_kinds(skip, "skip")
    out = {}
    for k in KEYS:
        if k not in skip:
            continue
        per_group = skip[k]
        if not isinstance(per_group, (list, tuple)):
            raise PolicyError(f"skip.{k}: must be a list with one list of layers per group, got {per_group!r}")
        if len(per_group) != n_groups:
            raise PolicyError(f"skip.{k}: needs one list of layers per group ({n_groups}), got {len(per_group)}")
        kept = []
        for g, layers in enumerate(per_group):
            checked = _checked_layers(layers, f"skip.{k}[{g}]", num_layers)
            below = _effective_depth(depth, k, g, num_layers)
            kept.append(tuple(sorted(l for l in checked if l < below)))
        if any(kept):
            out[k] = tuple(kept)
    return MappingProxyType(out)


def check_ranker(ranker: Any) -> None:
    if ranker is not None and not isinstance(ranker, str):
        raise PolicyError(f"ranker: must be a string naming a ranker, got {ranker!r}")


def checked_meta(meta: Any) -> Mapping[str, Any]:
    """``meta`` (None for empty) as a read-only mapping."""
    if meta is None:
        meta = {}
    if not isinstance(meta, Mapping):
        raise PolicyError(f"meta: must be an object, got {meta!r}")
    return MappingProxyType(dict(meta))
