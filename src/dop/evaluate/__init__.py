"""Evaluation: data sets (``shapes:SPLIT`` or JSONL), VQA metrics, model loading and the
runner behind ``dop eval``. Importing this package loads no torch or transformers: they
load with the submodules that need them (``evaluate`` and ``load_model`` are lazy attributes)."""

from __future__ import annotations

from .datasets import DatasetError, Sample, load_dataset, load_jsonl
from .metrics import (
    TaskScore,
    average,
    exact_match,
    normalize_answer,
    rel_avg,
    score_tasks,
    vqa_accuracy,
    yes_no_scores,
)

__all__ = [
    "DatasetError",
    "EvalResult",
    "Sample",
    "TaskScore",
    "average",
    "chat_prompt",
    "evaluate",
    "exact_match",
    "load_dataset",
    "load_jsonl",
    "load_model",
    "normalize_answer",
    "prompt_builder_for",
    "rel_avg",
    "score_tasks",
    "vqa_accuracy",
    "yes_no_scores",
]


def __getattr__(name: str):
    if name in ("evaluate", "EvalResult"):
        from . import runner  # heavy: lazy attribute, so that importing the package loads no torch

        return getattr(runner, name)
    if name in ("load_model", "chat_prompt", "prompt_builder_for"):
        from . import loading  # heavy: lazy attribute, so that importing the package loads no torch

        return getattr(loading, name)
    raise AttributeError(f"module 'dop.evaluate' has no attribute {name!r}")
