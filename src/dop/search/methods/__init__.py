"""The methods dop is compared with, as searches that emit dop policies (docs/methods.md):

- ``vtw``: visual tokens withdrawn from every op after a layer chosen by KL;
- ``shortv``: visual tokens frozen (query and MLP skipped, keys/values kept) in the layers
  of least contribution;
- ``gsop``: greedily sorted operation pruning by joint KL (or task accuracy) per FLOP saved.

    from dop.search.methods import search
    result = search("gsop", model, processor, samples, budgets=["tokens:16"], ranker="vispruner")
    result.policy.to_json("policy.json")

Each takes the samples and budgets as :func:`dop.search.search` does and returns a
:class:`MethodResult` (``.policy``, ``.policies``, ``.results``, ``.trace``, ``.layer_evals``).
"""

from __future__ import annotations

from . import gsop, shortv, vtw
from .common import MethodBudget, MethodResult

METHODS = {"gsop": gsop.search, "shortv": shortv.search, "vtw": vtw.search}


def search(method: str, model, processor, samples, budget=None, **kwargs) -> MethodResult:
    """Run ``method`` (one of :data:`METHODS`) with its own keyword arguments."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods are {', '.join(sorted(METHODS))}")
    return METHODS[method](model, processor, samples, budget, **kwargs)


__all__ = ["METHODS", "MethodBudget", "MethodResult", "gsop", "search", "shortv", "vtw"]
