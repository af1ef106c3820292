"""Rankers that need no model state: identity, spatial, random."""

from __future__ import annotations

import torch

from .registry import register_ranker
from .base import Ranker, RankContext


@register_ranker
class IdentityRanker(Ranker):
    """Rank = order of appearance."""

    name = "identity"

    def rank(self, ctx: RankContext):
        return [torch.arange(n, device="cpu") for n in ctx.counts]


def _spread(count: int, size: int) -> list[int]:
    """``count`` evenly spaced indices of ``range(size)``, centred in equal cells."""
    return [((2 * i + 1) * size) // (2 * count) for i in range(count)]


def spatial_order(n: int, grid: tuple[int, int] | None, n_keep: int) -> torch.Tensor:
    """A uniform spatial sample of ``n_keep`` tokens first, then the rest in raster order.

    On a (rows, cols) grid: ``r`` evenly spaced rows (``r`` about ``sqrt(n_keep * rows / cols)``,
    so the lattice is as square as the grid), and in each of them an evenly spaced run of
    columns, ``n_keep // r`` or one more, chosen independently per row: exactly ``n_keep``
    tokens that reach from the top rows to the bottom ones and from the left columns to the
    right ones at every count (with at least 2 rows and 2 columns, every quarter of the grid
    is sampled once ``n_keep >= 4``). The former stride lattice fell to stride 1 past a third
    of the tokens and then kept the first rows only. Without a grid: a 1-D even spread."""
    if n == 0:
        return torch.arange(0, device="cpu")
    n_keep = max(1, min(n, n_keep or n))
    if grid is not None and grid[0] * grid[1] == n:
        rows, cols = grid
        r = min(round((n_keep * rows / cols) ** 0.5), rows, n_keep)
        if cols > 1 and n_keep >= 4:
            r = min(r, n_keep // 2)  # at least 2 columns per row: the left and the right half
        r = max(r, min(2, rows, n_keep))  # at least 2 rows: the top and the bottom half
        while r * cols < n_keep:  # a row holds at most cols tokens
            r += 1
        first = []
        for i, row in enumerate(_spread(r, rows)):
            per_row = n_keep // r + (1 if i < n_keep % r else 0)
            first += [row * cols + c for c in _spread(per_row, cols)]
        first = torch.tensor(first, dtype=torch.long, device="cpu")
    else:
        first = torch.tensor(_spread(n_keep, n), dtype=torch.long, device="cpu")
    mask = torch.ones(n, dtype=torch.bool, device="cpu")
    mask[first] = False
    return torch.cat([first, torch.nonzero(mask).flatten()])


@register_ranker
class SpatialRanker(Ranker):
    """A uniform spatial sample first (sized to the policy's kept count), then the rest."""

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
        for span in ctx.spans:  # seeded by the image's place in its own prompt: batching changes nothing
            g = torch.Generator().manual_seed(self.seed * 1000003 + span.index)
            out.append(torch.randperm(span.n, generator=g, device="cpu"))
        return out
