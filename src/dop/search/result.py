"""What a search returns, whatever searched (docs/design.md, "Search"; docs/methods.md): a
:class:`SearchResult` holding one :class:`BudgetResult` per budget, in the given order.

A space's search (``dop``, ``multigroup``) fills the proxy fields (``predicted``, the
solver's ``solution``, the divergence ``table``, ``verification``); a compared method
(GSOP, ShortV, VTW) fills ``divergence`` (its in-sample first-token KL) and a ``trace`` of
what it measured. Both price each policy in both FLOPs conventions the same way
(:func:`priced`) and say the same when a budget allows the unpruned cost
(:func:`unpruned_note`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..policy import Policy
from .cost import Budget, CostModel
from .robust import DEFAULT_AGGREGATE


@dataclass
class BudgetResult:
    """A searched policy at one budget."""

    budget: Budget
    convention: str  # the convention the budget is counted in
    limit: int  # the largest allowed decoder cost, in that convention
    policy: Policy
    flops: dict  # {"dop": {"before", "after", "fraction"}, "paper": {...}}
    params: dict = field(default_factory=dict)  # the searched parameters (a space's assignment, a method's choice)
    predicted: float | None = None  # summed proxy divergence (a space's search)
    divergence: float | None = None  # in-sample first-token KL, where the search measured it (methods)
    note: str | None = None  # e.g. the budget allows the unpruned cost, or cannot be met
    solution: Any = None  # the solver's Solution (a space's search)
    verification: Any = None  # Verification on the search's own samples (in-sample)
    heldout: Any = None  # the same policies on samples the search did not use
    certified: Any = None  # the candidates of a space's certified choice (Certified; candidates > 1)

    @property
    def met(self) -> bool:
        return self.flops[self.convention]["after"] <= self.limit

    def to_dict(self) -> dict:
        return {
            "budget": self.budget.spec, "convention": self.convention, "limit": self.limit, "met": self.met,
            "params": self.params, "predicted_divergence": self.predicted, "divergence": self.divergence,
            "flops": self.flops, "policy": self.policy.to_dict(), "note": self.note,
            "verification": self.verification.to_dict() if self.verification else None,
            "verification_heldout": self.heldout.to_dict() if self.heldout else None,
            "certified": self.certified.to_dict() if self.certified else None,
        }


@dataclass
class SearchResult:
    """One search (a space or a compared method) over every budget."""

    name: str  # the space or method searched
    results: list[BudgetResult]
    wall_s: float = 0.0
    shape: dict = field(default_factory=dict)  # the reference prompt shape
    layer_evals: int = 0  # decoder-layer evaluations spent (per sample, summed)
    naive_layer_evals: int = 0  # the same measurements, each as a full forward
    evaluations: int = 0  # policies measured on the samples (methods)
    trace: list[dict] = field(default_factory=list)  # a method's measurements, in order
    table: Any = None  # the DivergenceTable (a space's search)
    space: Any = None  # the Space (a space's search)
    table_s: float = 0.0  # building (or finishing) the table in this call
    verify_s: float = 0.0
    heldout_samples: int = 0  # samples of the held-out verification (0: none)
    certify_s: float = 0.0  # solving, with the candidates' true divergences (certified choice)
    certify_evaluations: int = 0  # candidate policies measured on every search sample
    certify_layer_evals: int = 0  # their decoder-layer calls, over the samples (as the table's layer_evals)
    aggregate: str = DEFAULT_AGGREGATE  # how per-sample divergences became one figure (a space's search)

    @property
    def method(self) -> str:
        return self.name

    @property
    def policy(self) -> Policy:
        return self.results[0].policy

    @property
    def policies(self) -> list[Policy]:
        return [r.policy for r in self.results]

    def to_dict(self) -> dict:
        return {
            "method": self.name, "space": self.space.key() if self.space is not None else None, "shape": self.shape,
            "wall_s": self.wall_s, "table_s": self.table_s, "verify_s": self.verify_s,
            "heldout_samples": self.heldout_samples, "layer_evals": self.layer_evals,
            "naive_layer_evals": self.naive_layer_evals, "evaluations": self.evaluations, "trace": self.trace,
            "certify_s": self.certify_s, "certify_evaluations": self.certify_evaluations,
            "certify_layer_evals": self.certify_layer_evals, "aggregate": self.aggregate,
            "results": [r.to_dict() for r in self.results],
        }


def flops_of(costs: dict[str, CostModel], policy: Policy) -> dict:
    """The policy's decoder cost in every convention of ``costs``, before and after pruning."""
    out = {}
    for c, cm in costs.items():
        before, after = cm.unpruned, cm.policy_cost(policy)
        out[c] = {"before": before, "after": after, "fraction": after / before if before else 1.0}
    return out


def unpruned_note(cost: CostModel, limit: int, convention: str) -> str | None:
    """The note of a budget at or above the unpruned cost (nothing is pruned), else None."""
    un = cost.unpruned
    if limit < un:
        return None
    return f"the budget allows the unpruned cost ({limit / un:.3g} of it, {convention} convention); nothing is pruned"


def priced(budget: Budget, convention: str, limit: int, policy: Policy, costs: dict[str, CostModel], ranker,
           meta: dict, note: str | None = None, **fields) -> BudgetResult:
    """``policy`` with its provenance ``meta`` (and ``note``) recorded and the searched
    ranker (a name; a callable is not recorded), priced in both conventions."""
    if note:
        meta = {**meta, "note": note}
    policy = policy.replace(ranker=ranker if isinstance(ranker, str) else None, meta=meta)
    return BudgetResult(budget, convention, limit, policy, flops_of(costs, policy), note=note, **fields)
