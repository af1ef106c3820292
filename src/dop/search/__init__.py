"""DOP search (docs/design.md, "Search"): first-token KL, divergence table (additive proxy), exact budgeted
solver, verification against the true joint divergence; the methods dop is compared with
(docs/methods.md) as ``search_method``.

    from dop.search import search
    result = search(model, processor, samples, budget=0.14, space="dop", ranker="vispruner")
"""

from __future__ import annotations

from .api import SearchConfig, search
from .cost import Budget, BudgetError, CostModel, parse_budget
from .divergence import PreparedSample, kl_divergence, prepare_samples, true_divergence
from .methods import METHODS, MethodBudget, MethodResult
from .methods import search as search_method
from .result import BudgetResult, SearchResult
from .spaces.solver import Solution, Solver
from .spaces import (
    DEFAULT_DRAW, DRAWS, SPACES, DopSpace, MultiGroupSpace, Param, Space, SpaceError, draw_feasible, make_space,
)
from .table import DivergenceTable, TableError, build_table
from .verify import Candidates, SampleSet, Verification, measure, verify

__all__ = [
    "Budget", "BudgetError", "BudgetResult", "Candidates", "CostModel", "DEFAULT_DRAW", "DRAWS",
    "DivergenceTable", "DopSpace", "METHODS", "MethodBudget", "MethodResult", "MultiGroupSpace", "Param",
    "PreparedSample", "SPACES", "SampleSet", "SearchConfig", "SearchResult", "Solution", "Solver", "Space", "SpaceError",
    "TableError", "Verification", "build_table", "draw_feasible", "kl_divergence", "make_space", "measure",
    "parse_budget", "prepare_samples", "search", "search_method", "true_divergence", "verify",
]
