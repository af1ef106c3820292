"""Certified choice (docs/design.md, "Certified choice"): the K best policies by summed proxy
(:func:`~dop.search.kbest.k_best`), their true joint first-token KL measured on the search
samples (:meth:`~dop.search.verify.SampleSet.measured`: the divergence table's batched
replays from each sample's cached unpruned run, the samples shared among the ranks), and the
one closest to the unpruned model chosen.

The additive proxy ranks policies well on models trained with operation dropout and poorly on
others (docs/benchmarks.md, "Proxy quality"); the true divergence of a few candidates is cheap
beside the table and turns the proxy's choice into a measured one. With ``candidates=1``
nothing is measured and the choice is the proxy's, exactly as before.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from .. import distributed as dd
from ..models import get_adapter
from ..policy import Policy
from .cost import BudgetError
from .kbest import k_best
from .robust import DEFAULT_AGGREGATE, aggregate, check_aggregate, outliers
from .spaces.solver import Solution, Solver
from .verify import SampleSet, spearman

# The proxy's own choice by default: on the demo models 8 measured candidates beat it on
# held-out samples in only 6 of 12 (model, space, budget) cells and lost in 5 (docs/benchmarks.md,
# "Certified choice"), so measuring them (about half the table's wall time at 3 budgets) is
# opt-in until a choice that holds out of sample replaces it
DEFAULT_CANDIDATES = 1


def check_candidates(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"--candidates must be a positive integer, got {k!r}")
    return k


@dataclass
class Certified:
    """The certified choice at one budget: the candidates in proxy order (``params``,
    ``proxy``, ``true`` on the search samples, ``cost``, ``policy``), which was chosen, and,
    once measured, their true divergence on held-out samples."""

    candidates: list[dict]  # in proxy order; each with its per-sample divergences ("per_sample")
    chosen: int
    aggregate: str
    samples: int
    sample_ids: list[str] = field(default_factory=list)
    heldout: list[float] | None = None  # per candidate, on the held-out samples
    heldout_samples: int = 0
    heldout_per_sample: list[list[float]] | None = None

    @property
    def chosen_per_sample(self) -> list[float]:
        return self.candidates[self.chosen]["per_sample"]

    @property
    def outliers(self) -> list[dict]:
        """Search samples on which the chosen policy's divergence exceeds 10x its median."""
        return outliers(self.chosen_per_sample, self.sample_ids)

    @property
    def spearman_heldout(self) -> float | None:
        """Spearman of the candidates' ranking (true divergence on the search samples) against
        their true divergence on the held-out samples."""
        return self._rho("true")

    @property
    def spearman_proxy_heldout(self) -> float | None:
        """Spearman of the candidates' proxy against their held-out true divergence."""
        return self._rho("proxy")

    def _rho(self, by: str) -> float | None:
        if self.heldout is None:
            return None
        return spearman([{"proxy": c[by], "true": h} for c, h in zip(self.candidates, self.heldout)])[0]

    def meta(self) -> dict:
        """What the chosen policy's meta records."""
        c = self.candidates[self.chosen]
        return {"candidates": len(self.candidates), "rank_by_proxy": self.chosen + 1, "aggregate": self.aggregate,
                "search_true_divergence": c["true"]}

    def to_dict(self) -> dict:
        return {"candidates": self.candidates, "chosen": self.chosen, "aggregate": self.aggregate,
                "samples": self.samples, "chosen_per_sample": self.chosen_per_sample, "sample_ids": self.sample_ids,
                "outliers": self.outliers, "heldout": self.heldout, "heldout_samples": self.heldout_samples,
                "heldout_per_sample": self.heldout_per_sample,
                "spearman_heldout": self.spearman_heldout, "spearman_proxy_heldout": self.spearman_proxy_heldout}

    def measure_heldout(self, model, samples: SampleSet, ranker, how: str | None = None) -> None:
        """Every candidate's true divergence on ``samples`` (held-out), aggregated as chosen."""
        per = samples.measured(model, [(Policy.from_dict(c["policy"]), ranker) for c in self.candidates])[0]
        self.heldout = [aggregate(p, how or self.aggregate) for p in per]
        self.heldout_samples = len(samples.prepared)
        self.heldout_per_sample = per


class Certifier:
    """``certifier(solver, limit, spec)``: the certified :class:`Solution` at one limit, its
    :class:`Certified` record kept in ``records[spec]``. Policies met at several budgets are
    measured once."""

    def __init__(self, model, samples: SampleSet, ranker, k: int = DEFAULT_CANDIDATES,
                 how: str = DEFAULT_AGGREGATE, progress: bool = True):
        self.model, self.samples, self.ranker = model, samples, ranker
        self.k, self.how, self.progress = check_candidates(k), check_aggregate(how), progress
        self.records: dict[str, Certified] = {}
        self._kbest: dict[str, list[Solution]] = {}  # the candidates prefetched per budget
        self.measured: dict = {}  # policy -> per-sample divergences
        self.evaluations = 0  # policies measured on every search sample
        # decoder-layer calls per sample: the reference logits' unpruned forward, then what
        # the measuring took (SampleSet.measured)
        self.layer_evals = get_adapter(model).num_layers

    def prefetch(self, jobs) -> None:
        """Measure the candidates of every ``(solver, limit, spec)`` together (one cached
        unpruned run per sample for all budgets, 8 candidates per batched replay); a budget
        nothing fits is left to :meth:`__call__`, which says so."""
        found = []
        for solver, limit, spec in jobs:
            try:
                found.append((spec, k_best(solver, limit, self.k, spec)))
            except BudgetError:
                continue
        self._kbest.update(found)
        self._per_sample([s.policy for _, sols in found for s in sols], "at every budget")

    def __call__(self, solver: Solver, limit: int, spec: str = "") -> Solution:
        sols = self._kbest.pop(spec, None) or k_best(solver, limit, self.k, spec)
        per = self._per_sample([s.policy for s in sols], spec)
        trues = [aggregate(p, self.how) for p in per]
        best = min(range(len(sols)), key=lambda i: (trues[i], i))  # ties: the better proxy
        rows = [{"params": dict(s.assign), "proxy": s.predicted, "true": t, "cost": s.cost,
                 "policy": s.policy.to_dict(), "per_sample": p} for s, t, p in zip(sols, trues, per)]
        self.records[spec] = Certified(rows, best, self.how, len(self.samples.prepared), self.samples.ids)
        return sols[best]

    def _per_sample(self, policies: list, spec: str) -> list[list[float]]:
        """Per policy its per-sample divergences; those not met before measured together
        (:meth:`SampleSet.measured`: batched replays where the ranker allows)."""
        todo = [p for p in dict.fromkeys(policies) if p not in self.measured]
        if todo:
            if dd.is_main() and self.progress:
                print(f"certified choice {spec}: measuring {len(todo)} candidate policies on "
                      f"{len(self.samples.prepared)} samples", file=sys.stderr)
            per, calls = self.samples.measured(self.model, [(p, self.ranker) for p in todo])
            self.measured.update(zip(todo, per))
            self.evaluations += len(todo)
            self.layer_evals += calls
        return [self.measured[p] for p in policies]
