"""DOP search (DESIGN 1): first-token KL, divergence table (additive proxy), exact budgeted
solver, verification against the true joint divergence.

    from dop.search import search
    result = search(model, processor, samples, budget=0.14, space="dop", ranker="vispruner")
"""

from __future__ import annotations

from .api import BudgetResult, SearchResult, search
from .cost import Budget, BudgetError, CostModel, parse_budget
from .divergence import PreparedSample, kl_divergence, prepare_samples, true_divergence
from .solver import Solution, Solver
from .spaces import SPACES, DopSpace, MultiGroupSpace, Param, Space, SpaceError, make_space
from .table import DivergenceTable, TableError, build_table
from .verify import Verification, random_feasible, verify

__all__ = [
    "Budget", "BudgetError", "BudgetResult", "CostModel", "DivergenceTable", "DopSpace", "MultiGroupSpace",
    "Param", "PreparedSample", "SPACES", "SearchResult", "Solution", "Solver", "Space", "SpaceError",
    "TableError", "Verification", "build_table", "kl_divergence", "make_space", "parse_budget",
    "prepare_samples", "random_feasible", "search", "true_divergence", "verify",
]
