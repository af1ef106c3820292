"""A toy search space in one file: one parameter ``D``, the layer from which every visual
token is withdrawn from every op, with its own exhaustive solver."""

from __future__ import annotations

from dop.policy import Policy
from dop.search.spaces import SPACES, Param, Space, SpaceError
from dop.search.spaces.solver import Solver


class ToySolver(Solver):
    def _prepare(self):
        self._depths = list(self.space.param("D").values)
        self._costs = [self.cost.policy_cost(self.space.policy({"D": d})) for d in self._depths]

    def _find(self, limit):
        fits = [(self.proxy["D"][d], c, d) for d, c in zip(self._depths, self._costs) if c <= limit]
        if not fits:
            return None
        obj, cost, d = min(fits)
        return {"D": d}, float(obj), int(cost)

    def cheapest(self):
        return min(self._costs)


@SPACES.register("toy")
class ToySpace(Space):
    solver = ToySolver

    def __init__(self, num_layers: int, n_ref: int, *, min_depth: int = 0):
        L = num_layers
        params = [Param("D", L, list(range(min_depth, L + 1)), list(range(min_depth, L)), kind="attn")]
        super().__init__("toy", L, n_ref, 0, params, min_depth)

    @classmethod
    def from_options(cls, num_layers, n_ref, *, groups=None, kinds=None, min_tokens=0, stride=1, nv_stride=None,
                     min_depth=0):
        if groups is not None or kinds is not None or nv_stride is not None or min_tokens or stride != 1:
            raise SpaceError("--space toy takes none of --groups, --kinds, --nv-stride, --min-tokens, --stride")
        return cls(num_layers, n_ref, min_depth=min_depth)

    def policy(self, assign):
        return Policy.token_pruning(self.num_layers, 0.0, int(assign["D"]))
