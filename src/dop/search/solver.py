"""Exact budgeted choice: minimise the summed proxy divergence subject to decoder cost <= limit.

``dop`` space: exhaustive over the whole grid (n_v x D_attn x D_mlp), vectorised.

``multigroup``: the cost of a layer is an attention part, which depends jointly on the query
and key/value rows it processes (the ``n_q x n_kv`` products couple groups and, with
``attn_q``/``attn_kv``, the two kinds), plus an MLP part linear in its rows. So:

- MLP: an additive knapsack over groups; its exact Pareto front (cost, divergence) is built
  group by group.
- Attention: a dynamic programme over layers whose state is the set of (kind, group) still
  active; at each layer any active ones may stop (their depth is that layer) and the layer's
  exact attention cost for the remaining set is paid. Costs are exact integers, and each
  state keeps its full Pareto front (no cost grid, no rounding): the future of a partial
  solution depends only on its state, so discarding dominated ones loses nothing.
- The two fronts are combined per budget by binary search.

Every answer is re-priced with ``dop.count_flops`` and must match to the FLOP.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..policy import Policy
from .cost import BudgetError, CostModel
from .spaces import DopSpace, MultiGroupSpace, Space


@dataclass
class Solution:
    assign: dict[str, int]
    predicted: float  # summed proxy divergence
    cost: int  # decoder cost (the cost model's convention)
    limit: int
    policy: Policy
    convention: str


def _pareto(cost: np.ndarray, obj: np.ndarray) -> np.ndarray:
    """Indices of the Pareto-optimal points (lower cost, lower objective), by increasing cost."""
    order = np.lexsort((obj, cost))
    o = obj[order]
    prev = np.concatenate([[np.inf], np.minimum.accumulate(o)[:-1]])
    return order[o < prev]


class Solver:
    """Precomputes what every budget shares; :meth:`solve` answers one limit."""

    def __init__(self, space: Space, proxy: dict[str, dict[int, float]], cost: CostModel):
        if cost.L != space.num_layers:
            raise ValueError(f"cost model has {cost.L} layers, space {space.num_layers}")
        self.space, self.proxy, self.cost = space, proxy, cost
        if isinstance(space, DopSpace):
            self._prepare_dop()
        elif isinstance(space, MultiGroupSpace):
            self._prepare_multigroup()
        else:
            raise ValueError(f"no solver for space {space.name!r}")

    # ------------------------------------------------------------------ dop: exhaustive
    def _prepare_dop(self):
        sp, c, L = self.space, self.cost, self.space.num_layers
        nvs = sp.param("n_v").values
        M, n_ref = sp.min_tokens, sp.n_ref
        depths = list(sp.param("D_attn").values)  # min_depth..L
        ca = np.zeros((len(nvs), len(depths)), dtype=np.int64)
        cm = np.zeros((len(nvs), len(depths)), dtype=np.int64)
        md, total = sp.min_depth, sum(c.counts)
        for i, nv in enumerate(nvs):
            s_min = s_nv = 0
            for n in c.counts:
                a = int(np.floor(M / n_ref * n + 1e-9))
                b = n if nv >= n_ref else int(np.floor(nv / n_ref * n + 1e-9))
                s_min += a
                s_nv += b - a
            # layers < md: every token; md..D-1: the top n_v; D..L-1: the top min_tokens
            all_a, hi_a, lo_a = c.attn(total, total), c.attn(s_min + s_nv, s_min + s_nv), c.attn(s_min, s_min)
            all_m, hi_m, lo_m = c.mlp(total), c.mlp(s_min + s_nv), c.mlp(s_min)
            ca[i] = [md * all_a + max(0, d - md) * hi_a + (L - max(d, md)) * lo_a for d in depths]
            cm[i] = [md * all_m + max(0, d - md) * hi_m + (L - max(d, md)) * lo_m for d in depths]
        self._total = ca[:, :, None] + cm[:, None, :]
        pv = [np.array([self.proxy[n][v] for v in sp.param(n).values]) for n in ("n_v", "D_attn", "D_mlp")]
        self._obj = pv[0][:, None, None] + pv[1][None, :, None] + pv[2][None, None, :]
        self._nvs, self._depths = nvs, depths

    def _solve_dop(self, limit: int) -> tuple[dict, float, int]:
        ok = self._total <= limit
        if not ok.any():
            return None
        flat = np.flatnonzero(ok)
        obj, tot = self._obj.reshape(-1)[flat], self._total.reshape(-1)[flat]
        best = flat[np.lexsort((flat, tot, obj))[0]]
        i, a, m = np.unravel_index(best, self._total.shape)
        return ({"n_v": int(self._nvs[i]), "D_attn": int(self._depths[a]), "D_mlp": int(self._depths[m])},
                float(self._obj[i, a, m]), int(self._total[i, a, m]))

    # ------------------------------------------------------------------ multigroup
    def _prepare_multigroup(self):
        sp = self.space
        sizes = self.cost.group_sizes(sp.policy(sp.baseline()))
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
            fronts, back = _advance(fronts, subs, T[:, l], A, nb)
            history.append(back)
        cost = np.concatenate([f[0] for f in fronts.values()])
        obj = np.concatenate([f[1] for f in fronts.values()])
        em = np.concatenate([np.full(len(f[0]), m) for m, f in fronts.items()])
        ei = np.concatenate([np.arange(len(f[0])) for f in fronts.values()])
        keep = _pareto(cost, obj)
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
            keep = _pareto(cost, obj)
            mc, mo = cost[keep], obj[keep]
            mback.append((pv[keep], pi[keep]))
        self._mc, self._mo, self._mback = mc, mo, mback

    def _solve_multigroup(self, limit: int):
        j = np.searchsorted(self._mc, limit - self._ac, side="right") - 1
        ok = j >= 0
        if not ok.any():
            return None
        idx = np.flatnonzero(ok)
        jj = j[idx]
        obj = self._ao[idx] + self._mo[jj]
        tot = self._ac[idx] + self._mc[jj]
        k = np.lexsort((tot, obj))[0]
        ai, mi = int(idx[k]), int(jj[k])
        sp, L = self.space, self.space.num_layers
        assign = sp.baseline()
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
        return assign, float(obj[k]), int(tot[k])

    # ------------------------------------------------------------------ public
    def cheapest(self) -> int:
        if isinstance(self.space, DopSpace):
            return int(self._total.min())
        return int(self._ac.min() + self._mc.min())

    def solve(self, limit: int, budget_text: str = "") -> Solution:
        found = self._solve_dop(limit) if isinstance(self.space, DopSpace) else self._solve_multigroup(limit)
        c = self.cost
        if found is None:
            low = self.cheapest()
            unit = "TMACs (paper convention)" if c.convention == "paper" else "decoder TFLOPs"
            raise BudgetError(
                f"budget {budget_text or limit} is infeasible: it allows {limit / 1e12:.4g} {unit} "
                f"({limit / c.unpruned:.4f} of the unpruned decoder), but the cheapest policy of space "
                f"{self.space.name!r} (--min-tokens {self.space.min_tokens}) costs {low / 1e12:.4g} "
                f"({low / c.unpruned:.4f}); raise the budget to at least {low / c.unpruned:.4f}"
            )
        assign, pred, tot = found
        # canonical form: a parameter that changes nothing (e.g. a depth for an empty group) unpruned
        policy = self.space.policy(assign)
        exact = c.count_flops(policy).decoder
        if exact != tot or exact > limit:
            raise RuntimeError(f"solver cost {tot} disagrees with count_flops {exact} for {policy.to_dict()}")
        return Solution(assign, pred, tot, limit, policy, c.convention)

    def proxy_of(self, assign: dict[str, int]) -> float:
        return float(sum(self.proxy[k][v] for k, v in assign.items()))


def _advance(fronts: dict, subs: dict, stop_cost, A, nb: int) -> tuple[dict, dict]:
    """One layer of the attention dynamic programme: every active set ``mask`` may stop any
    subset of its bits here (at proxy ``stop_cost[b]`` each); the layer then costs
    ``A[new mask]``. Returns the Pareto front per new mask and its back pointers."""
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
        keep = _pareto(cost, obj)
        new[nm] = (cost[keep], obj[keep])
        back[nm] = (pm[keep], ps[keep], pi[keep])
    return new, back
