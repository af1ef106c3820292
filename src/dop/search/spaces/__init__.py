"""Search spaces (docs/design.md, "Search"): one file each, registered in :data:`SPACES`
(``dop``: the paper's n_v, D_attn, D_mlp; ``multigroup``: one depth per op kind and rank
group). A space owns its solver (``Space.solver``, beside it in its file). A new space is
one new file here that subclasses :class:`Space` and registers itself::

    @SPACES.register("toy")
    class ToySpace(Space):
        solver = ToySolver
        ...
"""

from __future__ import annotations

from .base import (
    DEFAULT_DRAW, DEFAULT_GROUPS, DEFAULT_KINDS, DRAWS, SPACES, Param, Space, SpaceError, check_draw, check_groups,
    check_kinds, draw_feasible, make_space,
)
from .dop import DopSpace
from .multigroup import MultiGroupSpace

__all__ = ["DEFAULT_DRAW", "DEFAULT_GROUPS", "DEFAULT_KINDS", "DRAWS", "SPACES", "DopSpace", "MultiGroupSpace",
           "Param", "Space", "SpaceError", "check_draw", "check_groups", "check_kinds", "draw_feasible",
           "make_space"]
