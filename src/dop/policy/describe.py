"""One line saying what a policy prunes (``Policy.describe``; docs/design.md, "Per-layer skips")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def layer_spans(layers: Sequence[int]) -> str:
    """Sorted layer indices as runs: ``[3, 4, 5, 9]`` -> ``"3-5, 9"``."""
    runs: list[list[int]] = []
    for l in layers:
        if runs and l == runs[-1][1] + 1:
            runs[-1][1] = l
        else:
            runs.append([l, l])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def describe_policy(policy: Any, n_visual: int | None = None) -> str:
    """Its groups, depths and skips; given ``n_visual``, each kind's rank ranges of an image of
    that many visual tokens. ``"unpruned"`` when nothing is pruned."""
    if policy.is_unpruned():
        return "unpruned"
    if n_visual is None:
        d = policy.to_dict()
        return f"groups {d['groups']} depth {d['depth']}" + (f" skip {d['skip']}" if policy.skip else "")
    bounds = policy.group_bounds(n_visual)
    parts = [(k, [f"ranks {s}-{e - 1} to layer {d}" for (s, e), d in zip(bounds, ds) if e > s])
             for k, ds in sorted(policy.depth.items())]
    parts += [(f"{k} skipped", [f"ranks {s}-{e - 1} at layers {layer_spans(ls)}" for (s, e), ls in zip(bounds, v)
                                if e > s and ls]) for k, v in sorted(policy.skip.items())]
    return "; ".join(f"{k}: {', '.join(xs)}" for k, xs in parts if xs) or "unpruned"
