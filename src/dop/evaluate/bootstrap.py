"""Bootstrap confidence intervals for accuracies and Rel. Avg. (issue 16).

The test samples are resampled with replacement *within each task* (every task keeps its
sample count, as Rel. Avg. weighs tasks equally), and every method is scored on the *same*
resampled indices as the unpruned model: the intervals of Rel. Avg. and of the difference
between two methods are paired, so the noise the methods share (which samples happen to be
hard) cancels. Samples are matched by their ``index`` in the test split.

Accuracy here is the mean per-sample score (``vqa_accuracy``), the figure the report gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95


def _scores_by_task(samples: Sequence[Mapping], tasks: Sequence[str], order: dict) -> dict[str, np.ndarray]:
    by = {t: np.zeros(len(order[t])) for t in tasks}
    pos = {t: {idx: i for i, idx in enumerate(order[t])} for t in tasks}
    seen = {t: 0 for t in tasks}
    for s in samples:
        t = s["task"]
        if t not in pos or s["index"] not in pos[t]:
            raise ValueError(f"bootstrap: sample {s['index']} (task {t!r}) is not in the unpruned run")
        by[t][pos[t][s["index"]]] = float(s["score"])
        seen[t] += 1
    for t in tasks:
        if seen[t] != len(order[t]):
            raise ValueError(f"bootstrap: task {t!r} has {seen[t]} samples here, {len(order[t])} unpruned")
    return by


@dataclass
class Bootstrap:
    """Resampled indices shared by every method (paired), drawn once from the unpruned run."""

    tasks: list[str]
    order: dict[str, list[int]]  # task -> sample indices (the unpruned run's order)
    draws: dict[str, np.ndarray]  # task -> (resamples, n_task) positions
    unpruned: dict[str, np.ndarray]  # task -> (resamples,) accuracies
    level: float = DEFAULT_LEVEL

    @classmethod
    def from_unpruned(cls, samples: Sequence[Mapping], resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                      level: float = DEFAULT_LEVEL) -> "Bootstrap":
        order: dict[str, list[int]] = {}
        for s in samples:
            order.setdefault(s["task"], []).append(s["index"])
        tasks = list(order)
        rng = np.random.default_rng(seed)
        draws = {t: rng.integers(0, len(order[t]), size=(resamples, len(order[t]))) for t in tasks}
        b = cls(tasks, order, draws, {}, level)
        b.unpruned = b._task_acc(samples)
        return b

    def _task_acc(self, samples: Sequence[Mapping]) -> dict[str, np.ndarray]:
        by = _scores_by_task(samples, self.tasks, self.order)
        return {t: by[t][self.draws[t]].mean(axis=1) for t in self.tasks}

    def _interval(self, values: np.ndarray) -> list[float]:
        a = (1.0 - self.level) / 2
        lo, hi = np.quantile(values, [a, 1.0 - a])
        return [float(lo), float(hi)]

    def _rel(self, acc: dict[str, np.ndarray]) -> np.ndarray | None:
        ratios = []
        for t in self.tasks:
            base = self.unpruned[t]
            with np.errstate(divide="ignore", invalid="ignore"):
                r = np.where(base > 0, acc[t] / np.where(base > 0, base, 1.0), np.nan)
            ratios.append(r)
        if not ratios:
            return None
        r = np.vstack(ratios)
        count = (~np.isnan(r)).sum(axis=0)
        if not count.any():
            return None  # the unpruned model scores 0 on every task: no Rel. Avg.
        # resamples where no task has an unpruned score have no Rel. Avg.: left out
        return np.nansum(r, axis=0)[count > 0] / count[count > 0]

    def method(self, samples: Sequence[Mapping]) -> dict:
        """Intervals of each task's accuracy, the average and Rel. Avg. for one method."""
        acc = self._task_acc(samples)
        avg = np.mean(np.vstack([acc[t] for t in self.tasks]), axis=0)
        rel = self._rel(acc)
        return {
            "level": self.level,
            "tasks": {t: self._interval(acc[t]) for t in self.tasks},
            "average": self._interval(avg),
            "rel_avg": self._interval(rel) if rel is not None else None,
        }

    def difference(self, a: Sequence[Mapping], b: Sequence[Mapping]) -> dict | None:
        """Paired interval of Rel. Avg.(a) - Rel. Avg.(b); ``beyond_noise`` when it excludes 0."""
        ra, rb = self._rel(self._task_acc(a)), self._rel(self._task_acc(b))
        if ra is None or rb is None or len(ra) != len(rb):
            return None
        d = ra - rb
        lo, hi = self._interval(d)
        return {"level": self.level, "interval": [lo, hi], "beyond_noise": bool(lo > 0 or hi < 0)}
