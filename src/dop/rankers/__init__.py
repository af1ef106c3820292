"""Rankers: the contract (:mod:`.base`), the registry (:mod:`.registry`) and the registered
methods (one module each). Importing the package registers them all."""

from __future__ import annotations

from .base import LayerState, RankContext, Ranker, check_permutation
from .registry import known_rankers, register_ranker, resolve_for_model, resolve_ranker, run_ranker

from . import basic, cdpruner, dart, fastv, pdrop, vispruner  # noqa: E402,F401  (registration)

__all__ = [
    "LayerState", "RankContext", "Ranker", "check_permutation", "known_rankers",
    "register_ranker", "resolve_for_model", "resolve_ranker", "run_ranker",
]
