"""What every search space shares (docs/design.md, "Search"); the spaces themselves (the
paper's ``dop``: n_v, D_attn, D_mlp; ``multigroup``) are one file each beside this one, and
register in :data:`SPACES`.

A space is a list of :class:`Param` (a name, the values the solver may pick, the values the
divergence table measures, the unpruned value) and a map from an assignment of values to a
:class:`~dop.policy.Policy`. Every parameter's unpruned value leaves the model unchanged, so
the table measures each parameter alone with the others at that value.

``min_depth``: rankers that re-rank inside the LLM (FastV-like, first re-ranking layer K)
need every visual token active up to and including layer K, so no op may stop below
``K + 1``; tokens past ``n_v`` are then pruned from that layer on.

``min_tokens`` (M) puts the top-M ranked visual tokens of every image in a leading group
that every op processes at every layer: no module ever sees fewer than M visual tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, ClassVar

from ...policy import KEYS, Policy
from ...registry import Registry

DEFAULT_GROUPS = (0.125, 0.25, 0.5, 1.0)
DEFAULT_KINDS = ("attn", "mlp")
EPS = 1e-9


class SpaceError(ValueError):
    """A search-space option is unusable; the message names it and what is accepted."""


# name -> Space subclass; every module of dop.search.spaces registers its own
SPACES: Registry[type["Space"]] = Registry("search space", error=SpaceError, package="dop.search.spaces")


def grid(lo: int, hi: int, stride: int) -> list[int]:
    """Measured points of a parameter over ``[lo, hi)`` (``hi`` is the unpruned value)."""
    return list(range(lo, hi, stride))


@dataclass
class Param:
    name: str
    unpruned: int
    values: list[int]  # every value the solver may choose (the unpruned one included)
    measured: list[int]  # values the table measures (the unpruned one excluded: divergence 0)
    kind: str | None = None  # op kind of a depth parameter
    group: int | None = None  # group index (within the searched groups) of a depth parameter
    start: int = 0  # first layer a change of a non-depth parameter (n_v) affects

    def start_layer(self, value: int) -> int:
        """The first decoder layer whose computation differs from the unpruned run."""
        return self.start if self.kind is None else int(value)

    def interpolate(self, measured: dict[int, float]) -> dict[int, float]:
        """Proxy value of every candidate: measured points, the unpruned value at 0, linear
        interpolation in between."""
        pts = dict(measured)
        pts[self.unpruned] = 0.0
        xs = sorted(pts)
        out = {}
        for v in self.values:
            if v in pts:
                out[v] = float(pts[v])
                continue
            hi = next(x for x in xs if x > v)
            lo = max(x for x in xs if x < v)
            t = (v - lo) / (hi - lo)
            out[v] = float(pts[lo] * (1 - t) + pts[hi] * t)
        return out


@dataclass
class Space:
    """Base class: ``params``, ``policy(assign)`` and a ``key()`` for table files."""

    name: str
    num_layers: int
    n_ref: int  # visual tokens per image the grid is laid out for
    min_tokens: int = 0
    params: list[Param] = field(default_factory=list)
    min_depth: int = 0  # no op stops below this layer (rankers that re-rank inside the LLM)

    # the Solver subclass that answers budgets over this space (set by each space's file)
    solver: ClassVar[type]
    # `dop search` options only this space takes (argparse names), with their "not given" value
    options: ClassVar[dict] = {}

    @classmethod
    def from_options(cls, num_layers: int, n_ref: int, *, groups=None, kinds=None, min_tokens: int = 0,
                     stride: int = 1, nv_stride: int | None = None, min_depth: int = 0) -> "Space":
        """The space from `dop search`'s options; an option that does not apply to it is a
        :class:`SpaceError` naming it."""
        raise NotImplementedError

    def unpruned_assign(self) -> dict[str, int]:
        """Every parameter at its unpruned value (the policy that changes nothing)."""
        return {p.name: p.unpruned for p in self.params}

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def policy(self, assign: dict[str, int]) -> Policy:
        raise NotImplementedError

    def single(self, name: str, value: int) -> Policy:
        """The policy with ``name`` at ``value`` and every other parameter unpruned."""
        a = self.unpruned_assign()
        a[name] = value
        return self.policy(a)

    def key(self) -> dict:
        return {
            "space": self.name, "num_layers": self.num_layers, "n_ref": self.n_ref,
            "min_tokens": self.min_tokens, "min_depth": self.min_depth,
            "measured": {p.name: list(p.measured) for p in self.params},
        }

    def describe(self, assign: dict[str, int]) -> str:
        return ", ".join(f"{p.name}={assign[p.name]}" for p in self.params)


def compose(L: int, n_ref: int, segments: list[tuple[int, dict[str, int]]], kinds) -> Policy:
    """A policy from consecutive rank segments ``(end count, depth per kind)``; empty
    segments are dropped, fractions are ``end / n_ref``."""
    groups, depth, start = [], {k: [] for k in kinds}, 0
    for end, ds in segments:
        if end <= start:
            continue
        groups.append(1.0 if end >= n_ref else end / n_ref)
        for k in kinds:
            depth[k].append(int(ds[k]))
        start = end
    if not groups:
        groups, depth = [1.0], {k: [L] for k in kinds}
    return Policy(L, groups, depth)


def check_common(L: int, n_ref: int, min_tokens: int, stride: int, min_depth: int = 0) -> None:
    if not (0 <= min_depth < L):
        raise SpaceError(
            f"the ranker re-ranks inside the LLM from layer {min_depth - 1}, which leaves no depth to search "
            f"in a model of {L} layers"
        )
    if not isinstance(n_ref, int) or n_ref < 1:
        raise SpaceError(f"the samples hold no visual tokens (n_ref={n_ref!r})")
    if not isinstance(min_tokens, int) or isinstance(min_tokens, bool) or not (0 <= min_tokens < n_ref):
        raise SpaceError(f"--min-tokens must be an integer in [0, {n_ref - 1}] (images hold {n_ref} visual tokens), got {min_tokens!r}")
    if not isinstance(stride, int) or isinstance(stride, bool) or not (1 <= stride <= L):
        raise SpaceError(f"--stride must be an integer in [1, {L}] (the model has {L} decoder layers), got {stride!r}")


def check_groups(groups) -> list[float]:
    try:
        fr = [float(x) for x in groups]
    except (TypeError, ValueError):
        raise SpaceError(f"--groups must be fractions such as 0.125,0.25,0.5,1, got {groups!r}") from None
    if not fr or any(not (0 < f <= 1) for f in fr) or any(b <= a for a, b in zip(fr, fr[1:])) or fr[-1] != 1.0:
        raise SpaceError(
            f"--groups must be strictly increasing fractions in (0, 1] ending with 1, got {groups!r}"
        )
    return fr


def check_kinds(kinds) -> tuple[str, ...]:
    if isinstance(kinds, str):
        kinds = [k.strip() for k in kinds.split(",") if k.strip()]
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KEYS]
    if not kinds or bad:
        raise SpaceError(f"--kinds: unknown op kind(s) {bad or kinds!r}; use attn,mlp or attn_q,attn_kv,mlp")
    if "attn" in kinds and ("attn_q" in kinds or "attn_kv" in kinds):
        raise SpaceError("--kinds: 'attn' may not be combined with 'attn_q' or 'attn_kv'")
    if len(set(kinds)) != len(kinds):
        raise SpaceError(f"--kinds: repeated op kind in {kinds!r}")
    return kinds


def make_space(name: str, num_layers: int, n_ref: int, **options) -> Space:
    """The registered space ``name`` (:data:`SPACES`) built from ``options`` (those of
    :meth:`Space.from_options`); options that do not apply to it are an error."""
    return SPACES.get(name).from_options(num_layers, n_ref, **options)


DRAWS = ("ordered", "uniform")
DEFAULT_DRAW = "ordered"  # docs/design.md, "Held-out verification"


def check_draw(draw: str) -> str:
    """``draw`` if it names a random-policy draw of :func:`draw_feasible`, else a :class:`SpaceError`."""
    if draw not in DRAWS:
        raise SpaceError(f"unknown draw {draw!r}; use one of {', '.join(DRAWS)}")
    return draw


def draw_feasible(space: Space, policy_cost: Callable[[Policy], float], limit: float, k: int, seed: int = 0,
                  draw: str = DEFAULT_DRAW, max_tries: int = 20000) -> list[dict]:
    """Up to ``k`` distinct random assignments of ``space`` whose policy costs at most ``limit``
    (``policy_cost``), to check the proxy against the truth (docs/design.md, "Search").

    ``uniform``: every parameter drawn uniformly, then randomly chosen parameters lowered at
    random until the policy fits. ``ordered``: the same, with the depths of each op kind
    non-increasing over the rank groups (a group of more important tokens is processed at
    least as deep as a later one: drawn values sorted, a lowered depth caps the later
    groups'). A uniform draw spends most of its policies on cutting the top-ranked tokens'
    attention early, which is as far from the unpruned model as the blind policy and leaves
    their order noise (docs/benchmarks.md, "Proxy quality"). Spaces without rank groups draw
    the same either way."""
    check_draw(draw)
    rng = random.Random(seed)
    ordered = draw == "ordered"
    out, seen = [], set()
    for _ in range(max_tries):
        if len(out) >= k:
            break
        a = {p.name: rng.choice(p.values) for p in space.params}
        if ordered:
            _sort_groups(space, a)
        c = policy_cost(space.policy(a))
        while c > limit:
            lowerable = [p for p in space.params if a[p.name] > min(p.values)]
            if not lowerable:
                break
            p = rng.choice(lowerable)
            a[p.name] = rng.choice([v for v in p.values if v < a[p.name]])
            if ordered:
                _cap_later_groups(space, a, p)
            c = policy_cost(space.policy(a))
        key = tuple(sorted(a.items()))
        if c <= limit and key not in seen:
            seen.add(key)
            out.append(a)
    return out


def _sort_groups(space: Space, a: dict[str, int]) -> None:
    """Each op kind's group depths of ``a`` sorted non-increasing over the groups (in place)."""
    by_kind: dict[str, list[Param]] = {}
    for p in space.params:
        if p.group is not None:
            by_kind.setdefault(p.kind, []).append(p)
    for params in by_kind.values():
        params.sort(key=lambda p: p.group)
        for p, v in zip(params, sorted((a[p.name] for p in params), reverse=True)):
            a[p.name] = v


def _cap_later_groups(space: Space, a: dict[str, int], lowered: Param) -> None:
    """Depths of ``lowered``'s kind in later groups capped at its new value (in place)."""
    if lowered.group is None:
        return
    for p in space.params:
        if p.kind == lowered.kind and p.group is not None and p.group > lowered.group:
            a[p.name] = min(a[p.name], a[lowered.name])
