"""The policy data type (docs/design.md, "Policies"): an immutable, validated depth per (op
kind, rank group), optionally (format 2, docs/design.md, "Per-layer skips") with the layers
below that depth where the operation is skipped all the same, and what it means for a token.

Its checks live in :mod:`dop.policy.schema`, its file format in :mod:`dop.policy.fileformat`,
rescaling in :mod:`dop.policy.transfer` and its one-line summary in :mod:`dop.policy.describe`;
the methods below are their one entry point.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .describe import describe_policy
from .errors import PolicyError
from .fileformat import checkpoint_policy_path, policy_from_dict, policy_from_json, policy_to_dict, policy_to_json
from .schema import (
    OP_KINDS,
    check_num_layers,
    check_ranker,
    checked_depth,
    checked_groups,
    checked_meta,
    checked_skip,
    primitive_depth,
)
from .transfer import transferred

_GROUP_EPS = 1e-9


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
        check_num_layers(self.num_layers)
        object.__setattr__(self, "groups", checked_groups(self.groups))
        object.__setattr__(self, "depth", checked_depth(self.depth, len(self.groups), self.num_layers))
        object.__setattr__(self, "skip", checked_skip(self.skip, self.depth, len(self.groups), self.num_layers))
        check_ranker(self.ranker)
        object.__setattr__(self, "meta", checked_meta(self.meta))

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
        """A policy from the JSON object of a policy file (:mod:`dop.policy.fileformat`)."""
        return policy_from_dict(cls, data)

    @classmethod
    def from_json(cls, path_or_text: str | os.PathLike) -> "Policy":
        """Load from a file path (or a JSON string starting with ``{``). JSON only, never pickle."""
        return policy_from_json(cls, path_or_text)

    # ------------------------------------------------------------------ output
    def to_dict(self) -> dict[str, Any]:
        return policy_to_dict(self)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """Serialise; write atomically to ``path`` when given (:mod:`dop.jsonio`'s writer:
        temporary file, fsync, rename). Returns the JSON text."""
        return policy_to_json(self, path)

    def save_pretrained(self, model_dir: str | os.PathLike) -> str:
        """Write the policy as ``dop_policy.json`` beside a checkpoint's ``config.json`` so it
        travels with the checkpoint (:meth:`from_pretrained` reads it back). Returns the path."""
        path = checkpoint_policy_path(model_dir, must_exist=False)
        self.to_json(path)
        return path

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> "Policy":
        """The policy saved with a checkpoint (``dop_policy.json`` in ``model_dir``)."""
        return cls.from_json(checkpoint_policy_path(model_dir, must_exist=True))

    def describe(self, n_visual: int | None = None) -> str:
        """One line saying what the policy prunes, per-layer skips included (docs/design.md,
        "Per-layer skips"): its groups, depths and skips; given ``n_visual``, each kind's rank
        ranges of an image of that many visual tokens. ``"unpruned"`` when nothing is pruned."""
        return describe_policy(self, n_visual)

    # ------------------------------------------------------------------ semantics
    def kind_depths(self, kind: str) -> list[int]:
        """Depth per group for a primitive op kind (``attn_q``, ``attn_kv`` or ``mlp``)."""
        if kind not in OP_KINDS:
            raise ValueError(f"unknown primitive op kind {kind!r}; expected one of {OP_KINDS}")
        return [primitive_depth(self.depth, kind, g, self.num_layers) for g in range(len(self.groups))]

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
        """Rescale depths to a model with ``num_layers`` layers (rule: :func:`~dop.policy.transfer_depth`,
        skips by :func:`~dop.policy.transfer_layer`).

        Warns (:class:`~dop.policy.TransferWarning`) when two distinct depths of the source become
        one, or when every skip of some kind and group falls between the new layers."""
        return transferred(self, num_layers, stacklevel=2)

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

