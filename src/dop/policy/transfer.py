"""Rescaling a policy to a model with another number of decoder layers (docs/design.md,
"Policies", "Transfer"): depths by :func:`transfer_depth`, per-layer skips by
:func:`transfer_layer`, with a :class:`~dop.policy.errors.TransferWarning` where the rescaled
policy loses a distinction the source made."""

from __future__ import annotations

import warnings
from typing import Any

from .errors import TransferWarning
from .schema import check_num_layers


def transfer_depth(d: int, old: int, new: int) -> int:
    """A depth ``d`` of an ``old``-layer policy on a ``new``-layer model: ``d * new / old``
    rounded half up, and at least 1 when ``d`` is: an operation the source kept in some
    layers is never erased (0 stays 0, ``old`` becomes ``new``). The former rule,
    ``round(d * new / old)``, rounded half to even and mapped depths [7, 5, 3, 1] of 8 layers
    to [4, 2, 2, 0] of 4, erasing an operation; this one gives [4, 3, 2, 1].
    """
    if d <= 0:
        return 0
    return max(1, min(new, (2 * d * new + old) // (2 * old)))  # floor(d * new / old + 1/2), exact


def transfer_layer(j: int, old: int, new: int) -> int:
    """The layer of an ``old``-layer model that layer ``j`` of a ``new``-layer model stands for:
    the one holding the midpoint ``(j + 1/2) * old / new`` (a midpoint on a boundary goes to the
    lower layer). A skip of the source at layer ``l`` becomes a skip at every new layer standing
    for ``l``; with this rule the layers below a depth ``d`` stand for exactly the new layers
    below :func:`transfer_depth` ``(d)`` (docs/design.md, "Per-layer skips")."""
    return max(0, ((2 * j + 1) * old + 2 * new - 1) // (2 * new) - 1)


def transferred(policy: Any, num_layers: int, *, stacklevel: int) -> Any:
    """``policy`` rescaled to ``num_layers`` layers (``Policy.transfer``); warnings point
    ``stacklevel`` frames up, at the caller of the public method."""
    check_num_layers(num_layers)
    old = policy.num_layers
    depth = {k: [transfer_depth(d, old, num_layers) for d in v] for k, v in policy.depth.items()}
    merged = sorted({(a, b, depth_b) for k, v in policy.depth.items() for a, depth_a in zip(v, depth[k])
                     for b, depth_b in zip(v, depth[k]) if a < b and depth_a == depth_b})
    if merged:
        shown = ", ".join(f"{a} and {b} -> {d}" for a, b, d in merged[:6])
        warnings.warn(TransferWarning(
            f"transfer {old} -> {num_layers} layers: distinct depths collapse ({shown}); the rescaled "
            "policy cannot tell those groups or kinds apart"), stacklevel=stacklevel + 1)
    skip = _transferred_skip(policy, num_layers, stacklevel=stacklevel + 2)
    return policy.replace(num_layers=num_layers, depth=depth, skip=skip,
                          meta={**policy.meta, "transferred_from_layers": old})


def _transferred_skip(policy: Any, num_layers: int, *, stacklevel: int) -> dict[str, list[list[int]]]:
    """The skips on a ``num_layers``-layer model (rule: :func:`transfer_layer`); warns when
    every skip of some kind and group falls between the new layers' midpoints."""
    old = policy.num_layers
    source = [transfer_layer(j, old, num_layers) for j in range(num_layers)]
    skip = {k: [[j for j, l in enumerate(source) if l in set(ls)] for ls in v] for k, v in policy.skip.items()}
    lost = [f"{k}[{g}]" for k, v in policy.skip.items() for g, ls in enumerate(v) if ls and not skip[k][g]]
    if lost:
        warnings.warn(TransferWarning(
            f"transfer {old} -> {num_layers} layers: every skipped layer of skip.{', skip.'.join(lost)} "
            "falls between the new layers; the rescaled policy performs those operations"), stacklevel=stacklevel)
    return skip

