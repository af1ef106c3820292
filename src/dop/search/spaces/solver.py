"""Exact budgeted choice: minimise the summed proxy divergence subject to decoder cost <= limit.

What every space's solver shares: the answer (:class:`Solution`), the Pareto filter, the
infeasible-budget message and the check that re-prices every answer with
``dop.count_flops`` (it must match to the FLOP). Each space's own algorithm lives beside
the space, in its file of :mod:`dop.search.spaces` (exhaustive for ``dop``, Pareto fronts
and a dynamic programme over layers for ``multigroup``); ``Solver(space, proxy, cost)``
builds the space's own subclass (``space.solver``).
"""

from __future__ import annotations

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


class Solver:
    """Precomputes what every budget shares; :meth:`solve` answers one limit.

    ``Solver(space, proxy, cost)`` returns the space's own solver (``space.solver``, a
    subclass), which implements :meth:`_prepare` (called once), :meth:`_find` (the best
    assignment within a limit: ``(assign, predicted, cost)`` or None) and :meth:`cheapest`."""

    def __new__(cls, space: Space, proxy=None, cost=None):
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
        assign, pred, tot = found
        # canonical form: a parameter that changes nothing (e.g. a depth for an empty group) unpruned
        policy = self.space.policy(assign)
        exact = c.count_flops(policy).decoder
        if exact != tot or exact > limit:
            raise RuntimeError(f"solver cost {tot} disagrees with count_flops {exact} for {policy.to_dict()}")
        return Solution(assign, pred, tot, limit, policy, c.convention)

    def proxy_of(self, assign: dict[str, int]) -> float:
        return float(sum(self.proxy[k][v] for k, v in assign.items()))
