"""The space ``multigroup`` (docs/design.md, "Search"): G rank groups (cumulative fractions),
one depth per (op kind, group), and its exact solver.

The cost of a layer is an attention part, which depends jointly on the query and key/value
rows it processes (the ``n_q x n_kv`` products couple groups and, with ``attn_q``/``attn_kv``,
the two kinds), plus an MLP part linear in its rows. So:

- MLP: an additive knapsack over groups; its exact Pareto front (cost, divergence) is built
  group by group.
- Attention: a dynamic programme over layers whose state is the set of (kind, group) still
  active; at each layer any active ones may stop (their depth is that layer) and the layer's
  exact attention cost for the remaining set is paid. Costs are exact integers, and each
  state keeps its full Pareto front (no cost grid, no rounding): the future of a partial
  solution depends only on its state, so discarding dominated ones loses nothing.
- The two fronts are combined per budget by binary search.

The K-best enumeration of the certified choice (:meth:`MultiGroupSolver.ranked`,
docs/design.md, "Certified choice") runs the same programme keeping the first K Pareto
layers per state instead of the front alone, then pairs the final attention and MLP points
exhaustively under the limit.
"""

from __future__ import annotations

import math

import numpy as np

from ...policy import Policy
from ..cost import CostModel
from .solver import Solver, pareto, pareto_layers
from .base import (
    DEFAULT_GROUPS, DEFAULT_KINDS, EPS, SPACES, Param, Space, SpaceError, check_common, check_groups, check_kinds, grid,
)


_PAIR_CHUNK = 1 << 22  # attention x MLP pairs priced at once by ranked() (bounds its memory)


class MultiGroupSolver(Solver):
    """Pareto fronts of attention (per layer, over the set of active bits) and of the MLP
    (per group), combined per budget.

    ``front(cost, obj)``: which partial solutions of a state survive, as indices sorted by
    cost; the Pareto front by default (what :meth:`solve` needs); :meth:`ranked` builds a
    solver keeping the first K Pareto layers instead (:func:`~.solver.pareto_layers`)."""

    def __init__(self, space: Space, proxy: dict[str, dict[int, float]], cost: CostModel, front=pareto):
        self._front = front
        self._layered: dict[int, MultiGroupSolver] = {}  # ranked()'s solvers, by layers kept
        super().__init__(space, proxy, cost)

    def _prepare(self):
        sp = self.space
        sizes = self.cost.group_sizes(sp.policy(sp.unpruned_assign()))
        s_min, S = (sizes[0], sizes[1:]) if sp.min_tokens > 0 else (0, sizes)
        self._S = S
        # attention bits: (kind, group)
        G, kinds = len(sp.fractions), sp.kinds
        if "attn" in kinds:
            self._bits = [("attn", g) for g in range(G)]
        else:
            self._bits = [(k, g) for k in ("attn_q", "attn_kv") if k in kinds for g in range(G)]
        self._attention_front(s_min, S)
        self._mlp_front(s_min, S)

    def _visual_rows(self, mask: int, kind: str, s_min: int, S) -> int:
        """Visual rows op ``kind`` processes at a layer where the bits of ``mask`` are active."""
        kinds, bits = self.space.kinds, self._bits
        v = s_min
        for g in range(len(S)):
            if "attn" in kinds:
                on = mask >> bits.index(("attn", g)) & 1
            elif kind in kinds:
                on = mask >> bits.index((kind, g)) & 1
            else:
                on = 1  # kind not searched: never skipped
            v += S[g] * on
        return v

    def _attention_front(self, s_min: int, S) -> None:
        """Pareto fronts of the attention bits layer by layer (dynamic programming over the set
        of still-active bits), with back pointers; then the front over all end states."""
        c, L, bits = self.cost, self.space.num_layers, self._bits
        nb = len(bits)
        A = np.array([c.attn(self._visual_rows(m, "attn_q", s_min, S), self._visual_rows(m, "attn_kv", s_min, S))
                      for m in range(1 << nb)], dtype=np.int64)
        # proxy of stopping bit b at layer l (inf where l is not a candidate depth)
        T = np.full((nb, L), np.inf)
        for b, (k, g) in enumerate(bits):
            for v, x in self.proxy[f"{k}[{g}]"].items():
                if v < L:
                    T[b, v] = x
        subs = {m: [s for s in range(m + 1) if s & m == s] for m in range(1 << nb)}
        fronts = {(1 << nb) - 1: (np.zeros(1, np.int64), np.zeros(1))}
        history = []
        for l in range(L):
            fronts, back = _advance(fronts, subs, T[:, l], A, nb, self._front)
            history.append(back)
        cost = np.concatenate([f[0] for f in fronts.values()])
        obj = np.concatenate([f[1] for f in fronts.values()])
        em = np.concatenate([np.full(len(f[0]), m) for m, f in fronts.items()])
        ei = np.concatenate([np.arange(len(f[0])) for f in fronts.values()])
        keep = self._front(cost, obj)
        self._ac, self._ao, self._aend = cost[keep], obj[keep], (em[keep], ei[keep])
        self._history = history

    def _mlp_front(self, s_min: int, S) -> None:
        """MLP: additive knapsack over groups, exact Pareto front with back pointers."""
        c, L = self.cost, self.space.num_layers
        if "mlp" not in self.space.kinds:
            self._mc = np.array([L * c.mlp(s_min + sum(S))], np.int64)
            self._mo, self._mback = np.zeros(1), []
            return
        slope = c.mlp_slope
        mc, mo = np.array([L * c.mlp(s_min)], np.int64), np.zeros(1)
        mback = []
        for g in range(len(S)):
            vals = sorted(self.proxy[f"mlp[{g}]"])
            cost = np.concatenate([mc + S[g] * v * slope for v in vals])
            obj = np.concatenate([mo + self.proxy[f"mlp[{g}]"][v] for v in vals])
            pv = np.concatenate([np.full(len(mc), v) for v in vals])
            pi = np.concatenate([np.arange(len(mc)) for _ in vals])
            keep = self._front(cost, obj)
            mc, mo = cost[keep], obj[keep]
            mback.append((pv[keep], pi[keep]))
        self._mc, self._mo, self._mback = mc, mo, mback

    def _find(self, limit: int):
        if self._front is not pareto:
            raise RuntimeError("solve() needs the Pareto fronts; a solver with other fronts serves ranked()")
        j = np.searchsorted(self._mc, limit - self._ac, side="right") - 1
        ok = j >= 0
        if not ok.any():
            return None
        idx = np.flatnonzero(ok)
        jj = j[idx]
        obj = self._ao[idx] + self._mo[jj]
        tot = self._ac[idx] + self._mc[jj]
        k = np.lexsort((tot, obj))[0]
        return self._assign(int(idx[k]), int(jj[k])), float(obj[k]), int(tot[k])

    def _assign(self, ai: int, mi: int) -> dict[str, int]:
        """The assignment of attention end point ``ai`` and MLP point ``mi`` (back pointers)."""
        sp, L = self.space, self.space.num_layers
        assign = sp.unpruned_assign()
        # attention: walk the layers back from the end state
        mask, i = int(self._aend[0][ai]), int(self._aend[1][ai])
        for l in range(L - 1, -1, -1):
            pm, ps, pi = self._history[l][mask]
            sub = int(ps[i])
            for b, (kd, g) in enumerate(self._bits):
                if sub >> b & 1:
                    assign[f"{kd}[{g}]"] = l
            mask, i = int(pm[i]), int(pi[i])
        for g in range(len(self._mback) - 1, -1, -1):
            pv, pi = self._mback[g]
            assign[f"mlp[{g}]"] = int(pv[mi])
            mi = int(pi[mi])
        return assign

    def cheapest(self) -> int:
        return int(self._ac.min() + self._mc.min())

    def ranked(self, limit: int, n: int) -> list[tuple[dict, float, int]]:
        """The ``n`` best feasible assignments by (proxy, cost), from the programme with
        ``n`` Pareto layers kept per state (docs/design.md, "Certified choice", says why
        that loses none of them); every budget of a search shares that solver."""
        if n not in self._layered:
            self._layered[n] = MultiGroupSolver(self.space, self.proxy, self.cost, front=pareto_layers(n))
        layered = self._layered[n]
        ac, ao, mc, mo = layered._ac, layered._ao, layered._mc, layered._mo
        rows = max(1, _PAIR_CHUNK // max(1, len(mc)))
        best = []  # (proxy, cost, attention point, MLP point) of the n best pairs so far
        for a0 in range(0, len(ac), rows):
            c = ac[a0:a0 + rows, None] + mc[None, :]
            o = np.where(c <= limit, ao[a0:a0 + rows, None] + mo[None, :], np.inf)
            flat = np.flatnonzero(np.isfinite(o))
            if len(flat) > n:  # keeps every pair tied with the n-th smallest: the sort below decides
                cut = np.partition(o.reshape(-1)[flat], n - 1)[n - 1]
                flat = flat[o.reshape(-1)[flat] <= cut]
            ai, mi = np.unravel_index(flat, o.shape)
            best = sorted(best + [(float(o[x, y]), int(c[x, y]), a0 + int(x), int(y)) for x, y in zip(ai, mi)])[:n]
        return [(layered._assign(a, m), obj, tot) for obj, tot, a, m in best]


def _advance(fronts: dict, subs: dict, stop_cost, A, nb: int, front=pareto) -> tuple[dict, dict]:
    """One layer of the attention dynamic programme: every active set ``mask`` may stop any
    subset of its bits here (at proxy ``stop_cost[b]`` each); the layer then costs
    ``A[new mask]``. Returns the ``front`` (Pareto by default) per new mask and its back
    pointers."""
    incoming: dict[int, list] = {}
    for mask, (fc, fo) in fronts.items():
        for sub in subs[mask]:
            d = 0.0
            for b in range(nb):
                if sub >> b & 1:
                    d += stop_cost[b]
            if d == np.inf:
                continue
            nm = mask & ~sub
            incoming.setdefault(nm, []).append((fc + A[nm], fo + d, mask, sub))
    new, back = {}, {}
    for nm, parts in incoming.items():
        cost = np.concatenate([p[0] for p in parts])
        obj = np.concatenate([p[1] for p in parts])
        pm = np.concatenate([np.full(len(p[0]), p[2]) for p in parts])
        ps = np.concatenate([np.full(len(p[0]), p[3]) for p in parts])
        pi = np.concatenate([np.arange(len(p[0])) for p in parts])
        keep = front(cost, obj)
        new[nm] = (cost[keep], obj[keep])
        back[nm] = (pm[keep], ps[keep], pi[keep])
    return new, back


@SPACES.register("multigroup")
class MultiGroupSpace(Space):
    """G rank groups (cumulative fractions), one depth per (op kind, group)."""

    solver = MultiGroupSolver
    options = {"groups": None, "kinds": None}

    def __init__(self, num_layers: int, n_ref: int, *, groups=DEFAULT_GROUPS, kinds=DEFAULT_KINDS,
                 min_tokens: int = 0, stride: int = 1, min_depth: int = 0):
        L, md = num_layers, min_depth
        check_common(L, n_ref, min_tokens, stride, md)
        groups = check_groups(groups)
        kinds = check_kinds(kinds)
        # the searched groups: those ending past the always-kept top-M tokens
        ends = [int(math.floor(f * n_ref + EPS)) for f in groups]
        kept = [(f, e) for f, e in zip(groups, ends) if e > min_tokens]
        if not kept:
            raise SpaceError(f"no group holds tokens past --min-tokens {min_tokens} of {n_ref}")
        self.fractions = [f for f, _ in kept]
        self.ends = [e for _, e in kept]
        self.kinds = kinds
        params = [
            Param(f"{k}[{g}]", L, list(range(md, L + 1)), grid(md, L, stride), kind=k, group=g)
            for k in kinds for g in range(len(kept))
        ]
        super().__init__("multigroup", L, n_ref, min_tokens, params, md)

    @classmethod
    def from_options(cls, num_layers: int, n_ref: int, *, groups=None, kinds=None, min_tokens: int = 0,
                     stride: int = 1, nv_stride: int | None = None, min_depth: int = 0) -> "MultiGroupSpace":
        if nv_stride is not None:
            raise SpaceError("--nv-stride applies to --space dop only")
        return cls(num_layers, n_ref, groups=groups or DEFAULT_GROUPS, kinds=kinds or DEFAULT_KINDS,
                   min_tokens=min_tokens, stride=stride, min_depth=min_depth)

    def key(self) -> dict:
        return {**super().key(), "groups": self.fractions, "kinds": list(self.kinds)}

    def policy(self, assign: dict[str, int]) -> Policy:
        L, M = self.num_layers, self.min_tokens
        G = len(self.fractions)
        depth = {k: [int(assign[f"{k}[{g}]"]) for g in range(G)] for k in self.kinds}
        groups = list(self.fractions)
        if M > 0:
            groups = [M / self.n_ref] + groups
            depth = {k: [L] + v for k, v in depth.items()}
        return Policy(L, groups, depth)
