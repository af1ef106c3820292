"""The paper's space ``dop`` (docs/design.md, "Search"): ``n_v`` visual tokens kept, processed
by attention to depth ``D_attn`` and by the MLP to depth ``D_mlp``; its solver is exhaustive
over the whole grid (n_v x D_attn x D_mlp), vectorised."""

from __future__ import annotations

import math

import numpy as np

from ...policy import Policy
from .solver import Solver
from .base import SPACES, Param, Space, SpaceError, check_common, compose, grid


class DopSolver(Solver):
    """Every (n_v, D_attn, D_mlp) priced and scored at once; a budget is a masked minimum."""

    def _prepare(self):
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

    def _find(self, limit: int) -> tuple[dict, float, int] | None:
        ok = self._total <= limit
        if not ok.any():
            return None
        flat = np.flatnonzero(ok)
        obj, tot = self._obj.reshape(-1)[flat], self._total.reshape(-1)[flat]
        return self._point(flat[np.lexsort((flat, tot, obj))[0]])

    def ranked(self, limit: int, n: int) -> list[tuple[dict, float, int]]:
        """The ``n`` best feasible grid points by (proxy, cost, grid index): the order in
        which :meth:`_find` breaks ties, so the first is its choice."""
        total, obj = self._total.reshape(-1), self._obj.reshape(-1)
        flat = np.flatnonzero(total <= limit)
        return [self._point(f) for f in flat[np.lexsort((flat, total[flat], obj[flat]))][:n]]

    def _point(self, flat: int) -> tuple[dict, float, int]:
        """``(assign, proxy, cost)`` of the grid point at flat index ``flat``."""
        i, a, m = np.unravel_index(flat, self._total.shape)
        return ({"n_v": int(self._nvs[i]), "D_attn": int(self._depths[a]), "D_mlp": int(self._depths[m])},
                float(self._obj[i, a, m]), int(self._total[i, a, m]))

    def cheapest(self) -> int:
        return int(self._total.min())


@SPACES.register("dop")
class DopSpace(Space):
    """``n_v`` visual tokens kept (ranks past it pruned from every op), processed by attention
    to depth ``D_attn`` and by the MLP to depth ``D_mlp``."""

    solver = DopSolver
    options = {"nv_stride": None}

    def __init__(self, num_layers: int, n_ref: int, *, min_tokens: int = 0, stride: int = 1,
                 nv_stride: int | None = None, min_depth: int = 0):
        L, md = num_layers, min_depth
        check_common(L, n_ref, min_tokens, stride, md)
        if nv_stride is None:
            nv_stride = max(1, math.ceil(n_ref / 32))
        if not isinstance(nv_stride, int) or nv_stride < 1:
            raise SpaceError(f"nv_stride must be a positive integer, got {nv_stride!r}")
        params = [
            Param("n_v", n_ref, list(range(min_tokens, n_ref + 1)), grid(min_tokens, n_ref, nv_stride), start=md),
            Param("D_attn", L, list(range(md, L + 1)), grid(md, L, stride), kind="attn"),
            Param("D_mlp", L, list(range(md, L + 1)), grid(md, L, stride), kind="mlp"),
        ]
        super().__init__("dop", L, n_ref, min_tokens, params, md)

    @classmethod
    def from_options(cls, num_layers: int, n_ref: int, *, groups=None, kinds=None, min_tokens: int = 0,
                     stride: int = 1, nv_stride: int | None = None, min_depth: int = 0) -> "DopSpace":
        if groups is not None or kinds is not None:
            raise SpaceError("--groups and --kinds apply to --space multigroup only (dop has n_v, D_attn, D_mlp)")
        return cls(num_layers, n_ref, min_tokens=min_tokens, stride=stride, nv_stride=nv_stride, min_depth=min_depth)

    def describe(self, assign: dict[str, int]) -> str:
        nv = int(assign["n_v"])
        if nv <= self.min_tokens:  # the depths apply to no token: printing them would contradict the policy
            kept = f"only the {self.min_tokens} protected tokens" if self.min_tokens else "no visual token"
            return f"n_v={nv} ({kept} kept; D_attn and D_mlp apply to no token)"
        return super().describe(assign)

    def policy(self, assign: dict[str, int]) -> Policy:
        L, M = self.num_layers, self.min_tokens
        nv, da, dm = int(assign["n_v"]), int(assign["D_attn"]), int(assign["D_mlp"])
        if not (M <= nv <= self.n_ref):
            raise SpaceError(f"n_v must lie in [{M}, {self.n_ref}], got {nv}")
        segs = [(M, {"attn": L, "mlp": L}), (nv, {"attn": da, "mlp": dm}), (self.n_ref, {"attn": self.min_depth, "mlp": self.min_depth})]
        return compose(L, self.n_ref, segs, ("attn", "mlp"))
