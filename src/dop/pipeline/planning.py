"""What the main job evaluates at each budget: the budgets as the baselines read them
(:class:`BudgetPlan`), and one :class:`MethodPlan` per searched policy (each space's, each
compared method's) and per token-pruning baseline fitted to the budget; a method that
cannot meet a budget is skipped, with the reason."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..baselines import BASELINES, resolve_budget, token_policy
from ..flops import count_flops, resolve_arch
from ..search import METHODS
from ..search.cost import DEFAULT_CONVENTION
from .job import Job


@dataclass(frozen=True)
class BudgetPlan:
    """One budget of the main job: its spec and label, the (fraction, convention) the
    baselines are fitted to, the tokens of a ``tokens:N`` budget, and its place on the
    Pareto plot's dop axis."""

    spec: str
    label: str
    fraction: float
    convention: str
    tokens: int | None
    dop_fraction: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MethodPlan:
    """One evaluation of the main job: a method's policy at one budget."""

    budget: BudgetPlan
    label: str  # "DOP (dop)", "vispruner", ...
    kind: str  # "dop" or "baseline"
    policy: dict  # the policy as JSON (the stage key holds it)
    ranker: str | None


def budget_for_baselines(spec: str, model, n_visual: int, n_text: int) -> BudgetPlan:
    """A budget spec as (fraction, convention) for the baselines, a label, and the fraction
    of the unpruned decoder FLOPs in the dop convention (the Pareto plot's x axis).

    The grammar and conventions are `dop search`'s (:func:`dop.baselines.resolve_budget`):
    ``tokens:N`` / ``tokens:a/b`` in the paper convention, fractions and TFLOPs in dop's."""

    frac, conv, n = resolve_budget(spec, model, n_visual, n_text, DEFAULT_CONVENTION)
    if n is not None:
        rep = count_flops(model, token_policy(num_layers_of(model), n_visual, n), num_visual_tokens=n_visual,
                          num_text_tokens=n_text)
        dop_frac = rep.decoder / rep.decoder_unpruned
        label = f"{spec} (FLOPs of {n} tokens)"
    else:
        dop_frac = frac
        label = f"{spec} ({100 * frac:.1f}% FLOPs, dop)"
    return BudgetPlan(spec=spec, label=label, fraction=frac, convention=conv, tokens=n, dop_fraction=dop_frac)


def num_layers_of(model) -> int:
    return resolve_arch(model).decoder.num_layers


def plan_methods(job: Job, budgets: list[BudgetPlan]) -> tuple[list[MethodPlan], list[dict]]:
    """Per budget, the plans of every planner of :data:`PLANNERS` in order (the searched
    policies, then the token-pruning baselines)."""
    plan, skipped = [], []
    for b in budgets:
        for planner in PLANNERS:
            plans, why = planner(job, b)
            plan += plans
            skipped += why
    return plan, skipped


def searched_plans(job: Job, b: BudgetPlan) -> tuple[list[MethodPlan], list[dict]]:
    """The searched policies at the budget: each space's ("DOP (space)"), then each compared
    method's (docs/methods.md); a method whose policy cannot meet the budget is skipped with
    its note."""
    plans = [MethodPlan(b, f"DOP ({space})", "dop", r["policies"][b.spec], job.opts.ranker)
             for space, r in job.spaces.items()]
    skipped = []
    for method, r in job.compared.items():
        entry, label = r["budgets"][b.spec], METHODS.get(method).label
        if not entry["met"]:
            job.log(f"[method] {method} at {b.spec}: skipped ({entry['note']})")
            skipped.append(dict(budget=b.spec, method=label, reason=entry["note"]))
            continue
        plans.append(MethodPlan(b, label, "method", entry["policy"], entry["policy"].get("ranker")))
    return plans, skipped


def baseline_plans(job: Job, b: BudgetPlan) -> tuple[list[MethodPlan], list[dict]]:
    """The token-pruning baselines fitted to the budget."""
    plans, skipped = [], []
    for method in job.opts.baselines:
        try:
            pol, ranker = fit_baseline(job.model, method, b, job.n_visual, job.n_text, job.num_layers)
        except ValueError as e:
            job.log(f"[baseline] {method} at {b.spec}: skipped ({e})")
            skipped.append(dict(budget=b.spec, method=method, reason=str(e)))
            continue
        plans.append(MethodPlan(b, method, "baseline", pol.to_dict(), ranker))
    return plans, skipped


# Who plans the evaluations at one budget: ``planner(job, budget) -> (plans, skipped)``. A new
# space, compared method or baseline needs nothing here: each registers itself.
PLANNERS = (searched_plans, baseline_plans)


def fit_baseline(model, method: str, b: BudgetPlan, n_visual: int, n_text: int, L: int):
    """A published token pruner as (Policy, ranker spec) at budget ``b``, its stages scaled to
    the model's depth: the settings its registration tries in turn (``Baseline.tries``: FastV
    and DART prune after layer 2, then 1; PDrop at L/4, L/2, 3L/4, then 1-2-3), the first that
    fits; the last one's reason when none does."""
    entry = BASELINES.get(method)
    kw = dict(budget=b.fraction, convention=b.convention, visual_tokens=n_visual, text_tokens=n_text)
    tries = {tuple(sorted(t.items())): t for t in entry.tries(L)}.values()  # a setting tried once
    error = None
    for t in tries:
        try:
            return entry.build(model, **t, **kw)
        except ValueError as e:
            error = e  # keep the last (earliest layers) reason
    raise error
