"""The methods dop is compared with, as searches that emit dop policies (docs/methods.md),
one file each, registered in :data:`METHODS`:

- ``vtw``: visual tokens withdrawn from every op after a layer chosen by KL;
- ``shortv``: visual tokens frozen (query and MLP skipped, keys/values kept) in the layers
  of least contribution;
- ``gsop``: greedily sorted operation pruning by joint KL (or task accuracy) per FLOP saved.

    from dop.search.methods import search
    result = search("gsop", model, processor, samples, budgets=["tokens:16"], ranker="vispruner")
    result.policy.to_json("policy.json")

Each takes the samples and budgets as :func:`dop.search.search` does and returns the same
:class:`~dop.search.result.SearchResult` (``.policy``, ``.policies``, ``.results``,
``.trace``, ``.layer_evals``). A new method is one new file here whose search function
carries ``@register_method(name, label)``.
"""

from __future__ import annotations

from ..result import BudgetResult, SearchResult
from .common import METHODS, Method, register_method

MethodBudget = BudgetResult  # the names of before one result type served every search
MethodResult = SearchResult


def search(method: str, model, processor, samples, budget=None, **kwargs) -> SearchResult:
    """Run ``method`` (one of :data:`METHODS`) with its own keyword arguments."""
    return METHODS.get(method).search(model, processor, samples, budget, **kwargs)


__all__ = ["METHODS", "Method", "MethodBudget", "MethodResult", "register_method", "search"]
