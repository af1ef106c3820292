"""Rankers that need no model state: identity, spatial, random."""

from __future__ import annotations

import torch

from . import register_ranker
from .base import Ranker, RankContext


@register_ranker
class IdentityRanker(Ranker):
    """Rank = order of appearance."""

    name = "identity"

    def rank(self, ctx: RankContext):
        return [torch.arange(n) for n in ctx.counts]


def spatial_order(n: int, grid: tuple[int, int] | None, n_keep: int) -> torch.Tensor:
    """A uniform spatial stride that picks about ``n_keep`` tokens first, then the rest in order.

    On a (rows, cols) grid the stride is 2-D (every s-th row and column, s chosen so the
    lattice holds at least ``n_keep`` tokens); without a grid it is a 1-D stride."""
    if n == 0:
        return torch.arange(0)
    n_keep = max(1, min(n, n_keep or n))
    if grid is not None and grid[0] * grid[1] == n:
        rows, cols = grid
        stride = max(1, int((n / n_keep) ** 0.5))
        while stride > 1 and ((rows + stride - 1) // stride) * ((cols + stride - 1) // stride) < n_keep:
            stride -= 1
        off = stride // 2
        r = torch.arange(min(off, rows - 1), rows, stride)
        c = torch.arange(min(off, cols - 1), cols, stride)
        first = (r[:, None] * cols + c[None, :]).reshape(-1)
    else:
        stride = max(1, n // n_keep)
        first = torch.arange(min(stride // 2, n - 1), n, stride)
    mask = torch.ones(n, dtype=torch.bool)
    mask[first] = False
    return torch.cat([first, torch.nonzero(mask).flatten()])


@register_ranker
class SpatialRanker(Ranker):
    """A uniform spatial stride first (sized to the policy's kept count), then the rest."""

    name = "spatial"

    def rank(self, ctx: RankContext):
        keeps = ctx.n_keep or [max(1, n // 4) for n in ctx.counts]
        return [spatial_order(s.n, s.grid, k) for s, k in zip(ctx.spans, keeps)]


@register_ranker
class RandomRanker(Ranker):
    """A seeded random permutation per image (seed, then image index)."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def rank(self, ctx: RankContext):
        out = []
        for i, n in enumerate(ctx.counts):
            g = torch.Generator().manual_seed(self.seed * 1000003 + i)
            out.append(torch.randperm(n, generator=g))
        return out
