"""The main job (`dop run`), one module per step (:mod:`dop.pipeline.run` holds the job
itself). results.json is tagged ``"format": "dop-results/1"`` (one model) or
``"dop-run-models/1"`` (several)."""

from __future__ import annotations

from .options import (
    DEFAULT_BASELINES, DEFAULT_BUDGETS, DEFAULT_METHODS, DEFAULT_SPACES, DEFAULT_VERIFY, RunOptions, validate_options,
)
from .planning import BudgetPlan, MethodPlan, budget_for_baselines
from .rows import FORMAT, ResultRow
from .run import run_main_job, run_models

__all__ = ["DEFAULT_BASELINES", "DEFAULT_BUDGETS", "DEFAULT_METHODS", "DEFAULT_SPACES", "DEFAULT_VERIFY", "FORMAT",
           "BudgetPlan", "MethodPlan", "ResultRow", "RunOptions", "budget_for_baselines", "run_main_job",
           "run_models", "validate_options"]
