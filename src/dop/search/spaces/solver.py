"""Exact budgeted choice: minimise the summed proxy divergence subject to decoder cost <= limit.

What every space's solver shares: the answer (:class:`Solution`), the Pareto filter, the
infeasible-budget message and the check that re-prices every answer with
``dop.count_flops`` (it must match to the FLOP). Each space's own algorithm lives beside
the space, in its file of :mod:`dop.search.spaces` (exhaustive for ``dop``, Pareto fronts
and a dynamic programme over layers for ``multigroup``); ``Solver(space, proxy, cost)``
builds the space's own subclass (``space.solver``).

:meth:`Solver.ranked` feeds the K-best enumeration of the certified choice
(:mod:`dop.search.kbest`, docs/design.md, "Certified choice"): a solver that knows its
space enumerates its best assignments itself; the default enumerates a small grid outright.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from ...policy import Policy
from ..cost import BudgetError, CostModel
from .base import Space


@dataclass
class Solution:
    assign: dict[str, int]
    predicted: float  # summed proxy divergence
    cost: int  # decoder cost (the cost model's convention)
    limit: int
    policy: Policy
    convention: str


def pareto(cost: np.ndarray, obj: np.ndarray) -> np.ndarray:
    """Indices of the Pareto-optimal points (lower cost, lower objective), by increasing cost."""
    order = np.lexsort((obj, cost))
    o = obj[order]
    prev = np.concatenate([[np.inf], np.minimum.accumulate(o)[:-1]])
    return order[o < prev]


def pareto_layers(k: int):
    """``front(cost, obj)`` keeping the first ``k`` Pareto layers (lower cost and objective
    better), as indices sorted by cost: layer 1 is :func:`pareto`'s front, each next layer
    the front of what is left; identical points fall into successive layers. With ``k = 1``
    it is :func:`pareto` itself."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k == 1:
        return pareto

    def front(cost: np.ndarray, obj: np.ndarray) -> np.ndarray:
        left = np.arange(len(cost))
        kept = []
        for _ in range(k):
            if not len(left):
                break
            layer = left[pareto(cost[left], obj[left])]
            kept.append(layer)
            left = np.setdiff1d(left, layer, assume_unique=True)
        idx = np.concatenate(kept) if kept else left
        return idx[np.lexsort((obj[idx], cost[idx]))]

    return front


GRID_LIMIT = 1 << 16  # assignments the default :meth:`Solver.ranked` enumerates outright, at most


class Solver:
    """Precomputes what every budget shares; :meth:`solve` answers one limit.

    ``Solver(space, proxy, cost)`` returns the space's own solver (``space.solver``, a
    subclass), which implements :meth:`_prepare` (called once), :meth:`_find` (the best
    assignment within a limit: ``(assign, predicted, cost)`` or None) and :meth:`cheapest`;
    it may implement :meth:`ranked` (the K-best enumeration) where its grid is large."""

    def __new__(cls, space: Space, *args, **kwargs):
        if cls is Solver:
            own = getattr(type(space), "solver", None)
            if own is None:
                raise ValueError(f"no solver for space {space.name!r}")
            cls = own
        return super().__new__(cls)

    def __init__(self, space: Space, proxy: dict[str, dict[int, float]], cost: CostModel):
        if cost.L != space.num_layers:
            raise ValueError(f"cost model has {cost.L} layers, space {space.num_layers}")
        self.space, self.proxy, self.cost = space, proxy, cost
        self._prepare()

    def _prepare(self) -> None:
        raise NotImplementedError

    def _find(self, limit: int) -> tuple[dict, float, int] | None:
        raise NotImplementedError

    def cheapest(self) -> int:
        """The decoder cost of the space's cheapest policy."""
        raise NotImplementedError

    def solve(self, limit: int, budget_text: str = "") -> Solution:
        found = self._find(limit)
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
        return self.solution(*found, limit)

    def solution(self, assign: dict[str, int], pred: float, tot: int, limit: int) -> Solution:
        """The :class:`Solution` of ``assign`` (summed proxy ``pred``), its cost ``tot``
        re-priced by ``count_flops``."""
        c = self.cost
        # canonical form: a parameter that changes nothing (e.g. a depth for an empty group) unpruned
        policy = self.space.policy(assign)
        exact = c.count_flops(policy).decoder
        if exact != tot or exact > limit:
            raise RuntimeError(f"solver cost {tot} disagrees with count_flops {exact} for {policy.to_dict()}")
        return Solution(assign, pred, tot, limit, policy, c.convention)

    def proxy_of(self, assign: dict[str, int]) -> float:
        return float(sum(self.proxy[k][v] for k, v in assign.items()))

    def ranked(self, limit: int, n: int) -> list[tuple[dict, float, int]]:
        """The ``n`` best feasible assignments within ``limit`` as ``(assign, predicted,
        cost)``, by (proxy, cost), fewer where fewer fit (:func:`dop.search.kbest.k_best`
        reads it). This default prices every assignment of the space's grid (at most
        :data:`GRID_LIMIT` of them); a space with a larger grid enumerates in its own solver."""
        params = self.space.params
        size = math.prod(len(p.values) for p in params)
        if size > GRID_LIMIT:
            raise ValueError(f"space {self.space.name!r} has {size} assignments, too many to enumerate for the "
                             f"K best (at most {GRID_LIMIT}) and its solver enumerates none; use candidates=1")
        rows = []
        for i, combo in enumerate(itertools.product(*(p.values for p in params))):
            assign = {p.name: int(v) for p, v in zip(params, combo)}
            tot = self.cost.policy_cost(self.space.policy(assign))
            if tot <= limit:
                rows.append((self.proxy_of(assign), tot, i, assign))
        rows.sort(key=lambda r: r[:3])
        return [(a, obj, tot) for obj, tot, _, a in rows[:n]]
