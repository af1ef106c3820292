"""Operation-pruning policy: schema, validation, JSON I/O, transfer (DESIGN 2.1).

A policy gives, per op kind and rank group, a *depth*: the number of leading decoder
layers that perform that operation for the visual tokens of that group.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

FORMAT = "dop-policy/1"
OP_KINDS = ("attn_q", "attn_kv", "mlp")
KEYS = ("attn", "attn_q", "attn_kv", "mlp")
_GROUP_EPS = 1e-9


class PolicyError(ValueError):
    """A policy (or policy file) breaks a rule of DESIGN 2.1."""


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class Policy:
    """Depth per (op kind, rank group).

    ``groups`` are cumulative fractions of the ranked visual tokens of one image;
    ``depth[kind][g]`` is how many leading decoder layers perform op ``kind`` for group ``g``.
    A kind left out of ``depth`` is never skipped.
    """

    num_layers: int
    groups: list[float] = field(default_factory=lambda: [1.0])
    depth: dict[str, list[int]] = field(default_factory=dict)
    ranker: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        if not _is_int(self.num_layers) or self.num_layers < 1:
            raise PolicyError(f"num_layers: must be a positive integer, got {self.num_layers!r}")
        if not isinstance(self.groups, (list, tuple)) or len(self.groups) == 0:
            raise PolicyError(f"groups: must be a non-empty list of fractions, got {self.groups!r}")
        prev = 0.0
        for i, f in enumerate(self.groups):
            if not _is_number(f):
                raise PolicyError(f"groups[{i}]: must be a number, got {f!r}")
            if not (0.0 < f <= 1.0):
                raise PolicyError(f"groups[{i}]: fractions must lie in (0, 1], got {f!r}")
            if f <= prev:
                raise PolicyError(f"groups: must be strictly increasing, got {list(self.groups)!r}")
            prev = f
        if self.groups[-1] != 1.0:
            raise PolicyError(f"groups: the last fraction must be 1.0, got {self.groups[-1]!r}")
        self.groups = [float(f) for f in self.groups]
        if not isinstance(self.depth, dict):
            raise PolicyError(f"depth: must be an object mapping op kinds to lists, got {self.depth!r}")
        for k in self.depth:
            if k not in KEYS:
                raise PolicyError(f"depth: unknown op kind {k!r}; known kinds are {', '.join(KEYS)}")
        if "attn" in self.depth and ("attn_q" in self.depth or "attn_kv" in self.depth):
            raise PolicyError("depth: 'attn' may not be combined with 'attn_q' or 'attn_kv'")
        for k, ds in self.depth.items():
            if not isinstance(ds, (list, tuple)):
                raise PolicyError(f"depth.{k}: must be a list of integers, got {ds!r}")
            if len(ds) != len(self.groups):
                raise PolicyError(
                    f"depth.{k}: needs one depth per group ({len(self.groups)}), got {len(ds)}"
                )
            for g, d in enumerate(ds):
                if not _is_int(d):
                    raise PolicyError(f"depth.{k}[{g}]: must be an integer, got {d!r}")
                if not (0 <= d <= self.num_layers):
                    raise PolicyError(
                        f"depth.{k}[{g}]: must lie in [0, num_layers={self.num_layers}], got {d}"
                    )
            self.depth[k] = [int(d) for d in ds]
        if self.ranker is not None and not isinstance(self.ranker, str):
            raise PolicyError(f"ranker: must be a string naming a ranker, got {self.ranker!r}")
        if not isinstance(self.meta, dict):
            raise PolicyError(f"meta: must be an object, got {self.meta!r}")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def unpruned(cls, num_layers: int, groups: list[float] | None = None) -> "Policy":
        """The policy that skips nothing."""
        return cls(num_layers=num_layers, groups=list(groups or [1.0]), depth={})

    @classmethod
    def token_pruning(cls, num_layers: int, keep_fraction: float, depth: int = 0) -> "Policy":
        """Prune every op of the tokens past ``keep_fraction`` from layer ``depth`` on."""
        if keep_fraction >= 1.0:
            return cls.unpruned(num_layers)
        if keep_fraction <= 0.0:
            return cls(num_layers, [1.0], {"attn": [depth], "mlp": [depth]})
        return cls(
            num_layers,
            [keep_fraction, 1.0],
            {"attn": [num_layers, depth], "mlp": [num_layers, depth]},
        )

    @classmethod
    def dop(cls, num_layers: int, n_v_fraction: float, d_attn: int, d_mlp: int) -> "Policy":
        """The paper's three-parameter space: keep ``n_v`` tokens to depths D_attn / D_mlp."""
        if n_v_fraction >= 1.0:
            return cls(num_layers, [1.0], {"attn": [d_attn], "mlp": [d_mlp]})
        if n_v_fraction <= 0.0:
            return cls(num_layers, [1.0], {"attn": [0], "mlp": [0]})
        return cls(num_layers, [n_v_fraction, 1.0], {"attn": [d_attn, 0], "mlp": [d_mlp, 0]})

    @classmethod
    def from_dict(cls, data: Any) -> "Policy":
        if not isinstance(data, dict):
            raise PolicyError(f"policy: must be a JSON object, got {type(data).__name__}")
        fmt = data.get("format")
        if fmt is None:
            raise PolicyError(f"format: missing; expected {FORMAT!r}")
        if fmt != FORMAT:
            raise PolicyError(f"format: unknown format {fmt!r}; expected {FORMAT!r}")
        for req in ("num_layers", "groups"):
            if req not in data:
                raise PolicyError(f"{req}: missing (required)")
        unknown = set(data) - {"format", "num_layers", "groups", "depth", "ranker", "meta"}
        if unknown:
            raise PolicyError(f"policy: unknown field(s) {', '.join(sorted(unknown))}")
        depth = data.get("depth", {})
        if not isinstance(depth, dict):
            raise PolicyError(f"depth: must be an object mapping op kinds to lists, got {depth!r}")
        return cls(
            num_layers=data["num_layers"],
            groups=list(data["groups"]) if isinstance(data["groups"], list) else data["groups"],
            depth={k: (list(v) if isinstance(v, list) else v) for k, v in depth.items()},
            ranker=data.get("ranker"),
            meta=dict(data.get("meta") or {}) if isinstance(data.get("meta", {}), dict) else data["meta"],
        )

    @classmethod
    def from_json(cls, path_or_text: str | os.PathLike) -> "Policy":
        """Load from a file path (or a JSON string starting with ``{``). JSON only, never pickle."""
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            path = os.fspath(path_or_text)
            if not os.path.exists(path):
                raise PolicyError(f"policy file {path!r}: no such file")
            where = f"policy file {path!r}"
            try:
                with open(path, encoding="utf-8") as fh:
                    text = fh.read()
            except UnicodeDecodeError:
                raise PolicyError(f"{where}: not valid JSON (not UTF-8 text; policies are JSON, never pickle)") from None
        else:
            where = "policy JSON"
        if not text.strip():
            raise PolicyError(f"{where}: empty file")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PolicyError(f"{where}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
        try:
            return cls.from_dict(data)
        except PolicyError as e:
            raise PolicyError(f"{where}: {e}") from None

    # ------------------------------------------------------------------ output
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": FORMAT,
            "num_layers": self.num_layers,
            "groups": list(self.groups),
            "depth": {k: list(v) for k, v in self.depth.items()},
        }
        if self.ranker is not None:
            out["ranker"] = self.ranker
        out["meta"] = dict(self.meta)
        return out

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """Serialise; write atomically to ``path`` when given. Returns the JSON text."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            path = os.fspath(path)
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(tmp, path)
        return text

    # ------------------------------------------------------------------ semantics
    def kind_depths(self, kind: str) -> list[int]:
        """Depth per group for a primitive op kind (``attn_q``, ``attn_kv`` or ``mlp``)."""
        if kind not in OP_KINDS:
            raise ValueError(f"unknown primitive op kind {kind!r}; expected one of {OP_KINDS}")
        if kind in self.depth:
            return list(self.depth[kind])
        if kind in ("attn_q", "attn_kv") and "attn" in self.depth:
            return list(self.depth["attn"])
        return [self.num_layers] * len(self.groups)

    def group_bounds(self, n: int) -> list[tuple[int, int]]:
        """Rank ranges ``[start, end)`` of each group for an image with ``n`` visual tokens."""
        bounds, start = [], 0
        for f in self.groups:
            end = int(math.floor(f * n + _GROUP_EPS))
            bounds.append((start, end))
            start = end
        return bounds

    def group_of_rank(self, n: int) -> list[int]:
        """Group index for every rank ``0..n-1``."""
        out = [0] * n
        for g, (s, e) in enumerate(self.group_bounds(n)):
            for r in range(s, e):
                out[r] = g
        return out

    def tokens_processed(self, kind: str, layer: int, n: int) -> int:
        """How many of an image's ``n`` visual tokens op ``kind`` processes at ``layer``."""
        ds = self.kind_depths(kind)
        return sum(e - s for (s, e), d in zip(self.group_bounds(n), ds) if layer < d)

    def is_unpruned(self) -> bool:
        return all(d == self.num_layers for k in OP_KINDS for d in self.kind_depths(k))

    def max_active_depth(self) -> int:
        """The lowest layer from which some visual op is skipped (num_layers if none)."""
        return min(min(self.kind_depths(k)) for k in OP_KINDS)

    def n_keep(self, n: int) -> int:
        """Visual tokens (of ``n``) that any op of the policy processes at layer 0."""
        return max(self.tokens_processed(k, 0, n) for k in OP_KINDS)

    def transfer(self, num_layers: int) -> "Policy":
        """Rescale depths to a model with ``num_layers`` layers: ``round(d * L_new / L_old)``."""
        if not _is_int(num_layers) or num_layers < 1:
            raise PolicyError(f"num_layers: must be a positive integer, got {num_layers!r}")
        scale = num_layers / self.num_layers
        depth = {k: [min(num_layers, int(round(d * scale))) for d in v] for k, v in self.depth.items()}
        meta = dict(self.meta)
        meta["transferred_from_layers"] = self.num_layers
        return Policy(num_layers, list(self.groups), depth, self.ranker, meta)

    def check_layers(self, num_layers: int, transfer: bool = False) -> "Policy":
        """Return a policy for a model of ``num_layers`` layers, or raise if they differ."""
        if num_layers == self.num_layers:
            return self
        if transfer:
            return self.transfer(num_layers)
        raise PolicyError(
            f"num_layers: the policy is for {self.num_layers} decoder layers but the model has "
            f"{num_layers}; pass transfer=True (CLI: `dop transfer`) to rescale its depths"
        )
