"""Operation-pruning policy: schema, validation, JSON I/O, transfer (docs/design.md, "Policies").

A policy gives, per op kind and rank group, a *depth*: the number of leading decoder
layers that perform that operation for the visual tokens of that group, and optionally
(format 2, docs/design.md, "Per-layer skips") the layers below that depth where the
operation is skipped all the same.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .jsonio import json_text, write_text_atomic

FORMAT = "dop-policy/1"  # depth only; what every policy without skips writes, byte for byte
FORMAT_SKIP = "dop-policy/2"  # depth plus per-layer skips (docs/design.md, "Per-layer skips")
FORMATS = (FORMAT, FORMAT_SKIP)
POLICY_FILE = "dop_policy.json"  # beside a checkpoint's config.json (Policy.save_pretrained)
OP_KINDS = ("attn_q", "attn_kv", "mlp")
KEYS = ("attn", "attn_q", "attn_kv", "mlp")
_GROUP_EPS = 1e-9
MAX_POLICY_BYTES = 1 << 20  # a policy is a few hundred bytes; a bigger file is not one
MAX_NESTING = 32  # JSON nesting depth of a policy file (meta included)
MAX_LAYERS = 4096


class PolicyError(ValueError):
    """A policy (or policy file) breaks a rule of docs/design.md, "Policies"."""


class ModelMismatchWarning(UserWarning):
    """A policy is applied to a model other than the one it records (``meta["model"]``)."""


class TransferWarning(UserWarning):
    """Rescaling a policy to another depth merged two distinct depths."""


def transfer_depth(d: int, old: int, new: int) -> int:
    """A depth ``d`` of an ``old``-layer policy on a ``new``-layer model: ``d * new / old``
    rounded half up, and at least 1 when ``d`` is: an operation the source kept in some
    layers is never erased (0 stays 0, ``old`` becomes ``new``). The former rule,
    ``round(d * new / old)``, rounded half to even and mapped depths [7, 5, 3, 1] of 8 layers
    to [4, 2, 2, 0] of 4, erasing an operation; this one gives [4, 3, 2, 1].
    """
    if d <= 0:
        return 0
    return max(1, min(new, (2 * d * new + old) // (2 * old)))  # floor(d * new / old + 1/2), exact


def transfer_layer(j: int, old: int, new: int) -> int:
    """The layer of an ``old``-layer model that layer ``j`` of a ``new``-layer model stands for:
    the one holding the midpoint ``(j + 1/2) * old / new`` (a midpoint on a boundary goes to the
    lower layer). A skip of the source at layer ``l`` becomes a skip at every new layer standing
    for ``l``; with this rule the layers below a depth ``d`` stand for exactly the new layers
    below :func:`transfer_depth` ``(d)`` (docs/design.md, "Per-layer skips")."""
    return max(0, ((2 * j + 1) * old + 2 * new - 1) // (2 * new) - 1)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _nesting_depth(text: str) -> int:
    """The deepest bracket nesting of JSON ``text`` (brackets inside strings not counted),
    found without parsing, so a deeply nested file never reaches the recursive parser."""
    depth = deepest = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _checked_groups(groups: Any) -> tuple[float, ...]:
    if not isinstance(groups, (list, tuple)) or len(groups) == 0:
        raise PolicyError(f"groups: must be a non-empty list of fractions, got {groups!r}")
    prev = 0.0
    for i, f in enumerate(groups):
        if not _is_number(f):
            raise PolicyError(f"groups[{i}]: must be a number, got {f!r}")
        if not (0.0 < f <= 1.0):
            raise PolicyError(f"groups[{i}]: fractions must lie in (0, 1], got {f!r}")
        if f <= prev:
            raise PolicyError(f"groups: must be strictly increasing, got {list(groups)!r}")
        prev = f
    if groups[-1] != 1.0:
        raise PolicyError(f"groups: the last fraction must be 1.0, got {groups[-1]!r}")
    return tuple(float(f) for f in groups)


def _check_kinds(table: Any, name: str) -> None:
    """``table`` (``depth`` or ``skip``) maps known op kinds, ``attn`` not beside its parts."""
    if not isinstance(table, Mapping):
        raise PolicyError(f"{name}: must be an object mapping op kinds to lists, got {table!r}")
    for k in table:
        if k not in KEYS:
            raise PolicyError(f"{name}: unknown op kind {k!r}; known kinds are {', '.join(KEYS)}")
    if "attn" in table and ("attn_q" in table or "attn_kv" in table):
        raise PolicyError(f"{name}: 'attn' may not be combined with 'attn_q' or 'attn_kv'")


def _checked_depth(depth: Any, n_groups: int, num_layers: int) -> Mapping[str, tuple[int, ...]]:
    _check_kinds(depth, "depth")
    out = {}
    for k, ds in depth.items():
        if not isinstance(ds, (list, tuple)):
            raise PolicyError(f"depth.{k}: must be a list of integers, got {ds!r}")
        if len(ds) != n_groups:
            raise PolicyError(f"depth.{k}: needs one depth per group ({n_groups}), got {len(ds)}")
        for g, d in enumerate(ds):
            if not _is_int(d):
                raise PolicyError(f"depth.{k}[{g}]: must be an integer, got {d!r}")
            if not (0 <= d <= num_layers):
                raise PolicyError(f"depth.{k}[{g}]: must lie in [0, num_layers={num_layers}], got {d}")
        out[k] = tuple(int(d) for d in ds)
    return MappingProxyType(out)


def _effective_depth(depth: Mapping[str, tuple[int, ...]], kind: str, g: int, num_layers: int) -> int:
    """The depth below which a skip of ``kind`` (``attn`` included) for group ``g`` changes anything."""
    if kind == "attn":
        return max(_effective_depth(depth, k, g, num_layers) for k in ("attn_q", "attn_kv"))
    if kind in depth:
        return depth[kind][g]
    if kind in ("attn_q", "attn_kv") and "attn" in depth:
        return depth["attn"][g]
    return num_layers


def _checked_layers(layers: Any, where: str, num_layers: int) -> list[int]:
    if not isinstance(layers, (list, tuple)):
        raise PolicyError(f"{where}: must be a list of layer indices, got {layers!r}")
    if len(layers) > num_layers:
        raise PolicyError(f"{where}: lists {len(layers)} layers, more than num_layers={num_layers}")
    for i, l in enumerate(layers):
        if not _is_int(l):
            raise PolicyError(f"{where}[{i}]: must be an integer, got {l!r}")
        if not (0 <= l < num_layers):
            raise PolicyError(f"{where}[{i}]: must lie in [0, num_layers={num_layers}), got {l}")
    if len(set(layers)) != len(layers):
        dup = sorted({l for l in layers if layers.count(l) > 1})
        raise PolicyError(f"{where}: layer(s) {dup} listed twice")
    return [int(l) for l in layers]


def _checked_skip(skip: Any, depth: Mapping[str, tuple[int, ...]], n_groups: int,
                  num_layers: int) -> Mapping[str, tuple[tuple[int, ...], ...]]:
    """Validate ``skip`` and return its canonical form (docs/design.md, "Per-layer skips"):
    sorted layers, entries at or beyond the kind's depth dropped, kinds left empty dropped."""
    skip = {} if skip is None else skip
    _check_kinds(skip, "skip")
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


def _spans(layers: Sequence[int]) -> str:
    """Sorted layer indices as runs: ``[3, 4, 5, 9]`` -> ``"3-5, 9"``."""
    runs: list[list[int]] = []
    for l in layers:
        if runs and l == runs[-1][1] + 1:
            runs[-1][1] = l
        else:
            runs.append([l, l])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _frozen_meta(meta: Any) -> Any:
    return MappingProxyType(dict(meta)) if isinstance(meta, Mapping) else meta


@dataclass(frozen=True)
class Policy:
    """Depth per (op kind, rank group); immutable (docs/design.md, "Policies").

    ``groups`` are cumulative fractions of the ranked visual tokens of one image;
    ``depth[kind][g]`` is how many leading decoder layers perform op ``kind`` for group ``g``.
    A kind left out of ``depth`` is never skipped. Lists given to the constructor are stored
    as tuples and ``depth``/``meta`` as read-only mappings, so a policy that passed
    validation stays valid: :meth:`replace`, :meth:`with_depth` and :meth:`with_meta`
    return a new, validated policy.
    """

    num_layers: int
    groups: tuple[float, ...] = (1.0,)
    depth: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    ranker: str | None = None
    meta: Mapping[str, Any] | None = field(default_factory=dict)
    skip: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        """Check every field and store the normalised, read-only form (frozen: object.__setattr__)."""
        if not _is_int(self.num_layers) or not 1 <= self.num_layers <= MAX_LAYERS:
            raise PolicyError(f"num_layers: must be a positive integer (at most {MAX_LAYERS}), got {self.num_layers!r}")
        object.__setattr__(self, "groups", _checked_groups(self.groups))
        object.__setattr__(self, "depth", _checked_depth(self.depth, len(self.groups), self.num_layers))
        object.__setattr__(self, "skip", _checked_skip(self.skip, self.depth, len(self.groups), self.num_layers))
        if self.ranker is not None and not isinstance(self.ranker, str):
            raise PolicyError(f"ranker: must be a string naming a ranker, got {self.ranker!r}")
        if self.meta is None:
            object.__setattr__(self, "meta", {})
        if not isinstance(self.meta, Mapping):
            raise PolicyError(f"meta: must be an object, got {self.meta!r}")
        object.__setattr__(self, "meta", _frozen_meta(self.meta))

    def validate(self) -> None:
        """Kept for callers of the mutable policy: a built policy is always valid."""
        self._validate()

    # ------------------------------------------------------------------ value semantics
    def __hash__(self) -> int:
        return hash((self.num_layers, self.groups, tuple(sorted(self.depth.items())),
                     tuple(sorted(self.skip.items())), self.ranker))

    def __reduce__(self):  # read-only mappings do not pickle; the JSON form does
        return (Policy.from_dict, (self.to_dict(),))

    def __repr__(self) -> str:
        skip = f", skip={dict(self.skip)}" if self.skip else ""
        return (f"Policy(num_layers={self.num_layers}, groups={self.groups}, depth={dict(self.depth)}, "
                f"ranker={self.ranker!r}, meta={dict(self.meta)}{skip})")

    def replace(self, **changes: Any) -> "Policy":
        """A new policy with ``changes`` (field=value) applied, validated like any other."""
        return dataclasses.replace(self, **changes)

    def with_depth(self, depth: Mapping[str, Any] | None = None, /, **kinds: Any) -> "Policy":
        """A new policy whose depths are ``depth`` (all kinds, when given) updated by ``kinds``:
        ``p.with_depth(attn=[8, 2])`` changes the attention depths and keeps the rest."""
        new = dict(self.depth if depth is None else depth)
        new.update(kinds)
        return self.replace(depth=new)

    def with_skip(self, skip: Mapping[str, Any] | None = None, /, **kinds: Any) -> "Policy":
        """A new policy whose per-layer skips are ``skip`` (all kinds, when given) updated by
        ``kinds``: ``p.with_skip(mlp=[[3, 5], []])`` skips group 0's MLP at layers 3 and 5."""
        new = dict(self.skip if skip is None else skip)
        new.update(kinds)
        return self.replace(skip=new)

    def with_meta(self, **entries: Any) -> "Policy":
        """A new policy whose ``meta`` holds ``entries`` on top of the current ones."""
        return self.replace(meta={**self.meta, **entries})

    def ranker_or(self, override: Any = None) -> Any:
        """The one rule naming a policy's ranker (docs/design.md, "Policies"): the caller's
        ``override`` when given, else the policy's own ``ranker``, else ``"identity"``."""
        if override is not None:
            return override
        return self.ranker if self.ranker is not None else "identity"

    # ------------------------------------------------------------------ constructors
    @classmethod
    def unpruned(cls, num_layers: int, groups: list[float] | None = None) -> "Policy":
        """The policy that skips nothing."""
        return cls(num_layers=num_layers, groups=tuple(groups or (1.0,)), depth={})

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
            raise PolicyError(f"format: missing; expected {FORMAT!r} or {FORMAT_SKIP!r}")
        if fmt not in FORMATS:
            raise PolicyError(f"format: unknown format {fmt!r}; expected {FORMAT!r} or {FORMAT_SKIP!r}")
        if "skip" in data and fmt == FORMAT:
            raise PolicyError(f"skip: per-layer skips need \"format\": {FORMAT_SKIP!r}, the file says {fmt!r}")
        for req in ("num_layers", "groups"):
            if req not in data:
                raise PolicyError(f"{req}: missing (required)")
        unknown = set(data) - {"format", "num_layers", "groups", "depth", "skip", "ranker", "meta"}
        if unknown:
            raise PolicyError(f"policy: unknown field(s) {', '.join(sorted(unknown))}")
        depth, skip = data.get("depth", {}), data.get("skip", {})
        _check_kinds(depth, "depth")
        _check_kinds(skip, "skip")
        meta = data.get("meta")
        return cls(
            num_layers=data["num_layers"],
            groups=data["groups"],
            depth=depth,
            ranker=data.get("ranker"),
            meta={} if meta is None else meta,
            skip=skip,
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
            if os.path.isdir(path):
                raise PolicyError(f"{where}: is a folder, not a file")
            try:
                with open(path, "rb") as fh:
                    raw = fh.read(MAX_POLICY_BYTES + 1)
            except OSError as e:
                raise PolicyError(f"{where}: cannot read ({e.strerror or e})") from None
            if len(raw) > MAX_POLICY_BYTES:
                raise PolicyError(f"{where}: larger than {MAX_POLICY_BYTES} bytes; not a policy file")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise PolicyError(f"{where}: not valid JSON (not UTF-8 text; policies are JSON, never pickle)") from None
        else:
            where = "policy JSON"
            if len(text) > MAX_POLICY_BYTES:
                raise PolicyError(f"{where}: longer than {MAX_POLICY_BYTES} characters; not a policy")
        if not text.strip():
            raise PolicyError(f"{where}: empty file")
        depth = _nesting_depth(text)
        if depth > MAX_NESTING:
            raise PolicyError(f"{where}: JSON nested {depth} levels deep (a policy needs at most {MAX_NESTING})")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PolicyError(f"{where}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
        except RecursionError:  # unreachable after the depth check; kept as a guard
            raise PolicyError(f"{where}: JSON nested too deeply") from None
        try:
            return cls.from_dict(data)
        except PolicyError as e:
            raise PolicyError(f"{where}: {e}") from None

    # ------------------------------------------------------------------ output
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": FORMAT_SKIP if self.skip else FORMAT,
            "num_layers": self.num_layers,
            "groups": list(self.groups),
            "depth": {k: list(v) for k, v in self.depth.items()},
        }
        if self.skip:
            out["skip"] = {k: [list(ls) for ls in v] for k, v in self.skip.items()}
        if self.ranker is not None:
            out["ranker"] = self.ranker
        out["meta"] = dict(self.meta)
        return out

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """Serialise; write atomically to ``path`` when given (:mod:`dop.jsonio`'s writer:
        temporary file, fsync, rename). Returns the JSON text."""
        text = json_text(self.to_dict())
        if path is not None:  # like open(path, "w"): a missing folder is an error, not created
            write_text_atomic(path, text, make_folder=False)
        return text

    def save_pretrained(self, model_dir: str | os.PathLike) -> str:
        """Write the policy as ``dop_policy.json`` beside a checkpoint's ``config.json`` so it
        travels with the checkpoint (:meth:`from_pretrained` reads it back). Returns the path."""
        folder = os.fspath(model_dir)
        if not os.path.isdir(folder):
            raise PolicyError(f"checkpoint folder {folder!r}: no such folder")
        path = os.path.join(folder, POLICY_FILE)
        self.to_json(path)
        return path

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> "Policy":
        """The policy saved with a checkpoint (``dop_policy.json`` in ``model_dir``)."""
        folder = os.fspath(model_dir)
        path = os.path.join(folder, POLICY_FILE)
        if not os.path.isfile(path):
            raise PolicyError(f"checkpoint folder {folder!r}: no {POLICY_FILE} (save one with Policy.save_pretrained)")
        return cls.from_json(path)

    def describe(self, n_visual: int | None = None) -> str:
        """One line saying what the policy prunes, per-layer skips included (docs/design.md,
        "Per-layer skips"): its groups, depths and skips; given ``n_visual``, each kind's rank
        ranges of an image of that many visual tokens. ``"unpruned"`` when nothing is pruned."""
        if self.is_unpruned():
            return "unpruned"
        if n_visual is None:
            d = self.to_dict()
            return f"groups {d['groups']} depth {d['depth']}" + (f" skip {d['skip']}" if self.skip else "")
        bounds = self.group_bounds(n_visual)
        parts = [(k, [f"ranks {s}-{e - 1} to layer {d}" for (s, e), d in zip(bounds, ds) if e > s])
                 for k, ds in sorted(self.depth.items())]
        parts += [(f"{k} skipped", [f"ranks {s}-{e - 1} at layers {_spans(ls)}" for (s, e), ls in zip(bounds, v)
                                    if e > s and ls]) for k, v in sorted(self.skip.items())]
        return "; ".join(f"{k}: {', '.join(xs)}" for k, xs in parts if xs) or "unpruned"

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

    def kind_skip(self, kind: str) -> list[tuple[int, ...]]:
        """Per group, the sorted layers below its depth where primitive op ``kind`` is skipped
        all the same (docs/design.md, "Per-layer skips"); empty tuples for a depth-only policy."""
        if kind not in OP_KINDS:
            raise ValueError(f"unknown primitive op kind {kind!r}; expected one of {OP_KINDS}")
        ds = self.kind_depths(kind)
        per_group = self.skip.get(kind, self.skip.get("attn") if kind != "mlp" else None)
        if per_group is None:
            return [()] * len(self.groups)
        return [tuple(l for l in ls if l < d) for ls, d in zip(per_group, ds)]

    def processed(self, kind: str, group: int, layer: int) -> bool:
        """Whether primitive op ``kind`` processes the visual tokens of ``group`` at ``layer``:
        ``layer < depth[kind][group]`` and ``layer`` is not in ``skip[kind][group]``."""
        if not 0 <= group < len(self.groups):
            raise ValueError(f"group {group} out of range: the policy has {len(self.groups)} groups")
        return layer < self.kind_depths(kind)[group] and layer not in self.kind_skip(kind)[group]

    def tokens_processed(self, kind: str, layer: int, n: int) -> int:
        """How many of an image's ``n`` visual tokens op ``kind`` processes at ``layer``."""
        ds, skips = self.kind_depths(kind), self.kind_skip(kind)
        return sum(e - s for (s, e), d, sk in zip(self.group_bounds(n), ds, skips) if layer < d and layer not in sk)

    def is_unpruned(self) -> bool:
        return not self.skip and all(d == self.num_layers for k in OP_KINDS for d in self.kind_depths(k))

    def max_active_depth(self) -> int:
        """The lowest layer at which some visual op is skipped (num_layers if none): below it,
        every visual token is processed by every op."""
        first_skip = [ls[0] for k in OP_KINDS for ls in self.kind_skip(k) if ls]
        return min([min(self.kind_depths(k)) for k in OP_KINDS] + first_skip)

    def n_keep(self, n: int) -> int:
        """The budget a ranker selects for: the most visual tokens (of ``n``) that one op kind
        processes at some layer (for a depth-only policy: at layer 0)."""
        bounds = self.group_bounds(n)
        return max(sum(e - s for (s, e), d, sk in zip(bounds, self.kind_depths(k), self.kind_skip(k)) if d > len(sk))
                   for k in OP_KINDS)

    def transfer(self, num_layers: int) -> "Policy":
        """Rescale depths to a model with ``num_layers`` layers (rule: :func:`transfer_depth`).

        Warns (:class:`TransferWarning`) when two distinct depths of the source become one."""
        if not _is_int(num_layers) or not 1 <= num_layers <= MAX_LAYERS:
            raise PolicyError(f"num_layers: must be a positive integer (at most {MAX_LAYERS}), got {num_layers!r}")
        old = self.num_layers
        depth = {k: [transfer_depth(d, old, num_layers) for d in v] for k, v in self.depth.items()}
        merged = sorted({(a, b, depth_b) for k, v in self.depth.items() for a, depth_a in zip(v, depth[k])
                         for b, depth_b in zip(v, depth[k]) if a < b and depth_a == depth_b})
        if merged:
            shown = ", ".join(f"{a} and {b} -> {d}" for a, b, d in merged[:6])
            warnings.warn(TransferWarning(
                f"transfer {old} -> {num_layers} layers: distinct depths collapse ({shown}); the rescaled "
                "policy cannot tell those groups or kinds apart"), stacklevel=2)
        skip = self._transferred_skip(num_layers)
        return self.replace(num_layers=num_layers, depth=depth, skip=skip,
                            meta={**self.meta, "transferred_from_layers": old})

    def _transferred_skip(self, num_layers: int) -> dict[str, list[list[int]]]:
        """The skips on a ``num_layers``-layer model (rule: :func:`transfer_layer`); warns when
        every skip of some kind and group falls between the new layers' midpoints."""
        old = self.num_layers
        source = [transfer_layer(j, old, num_layers) for j in range(num_layers)]
        skip = {k: [[j for j, l in enumerate(source) if l in set(ls)] for ls in v] for k, v in self.skip.items()}
        lost = [f"{k}[{g}]" for k, v in self.skip.items() for g, ls in enumerate(v) if ls and not skip[k][g]]
        if lost:
            warnings.warn(TransferWarning(
                f"transfer {old} -> {num_layers} layers: every skipped layer of skip.{', skip.'.join(lost)} "
                "falls between the new layers; the rescaled policy performs those operations"), stacklevel=3)
        return skip

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


def save_policy(policy: Policy, model_dir: str | os.PathLike) -> str:
    """``policy.save_pretrained(model_dir)``: ``dop_policy.json`` beside the checkpoint's config."""
    return policy.save_pretrained(model_dir)
