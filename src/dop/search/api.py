"""``search()``: samples in, one policy per budget out (docs/design.md, "Search").

    from dop.search import search
    result = search(model, processor, samples, budget=0.14, space="dop", ranker="vispruner")
    result.policy.to_json("policy.json")

One divergence table serves every budget: pass ``budgets=[...]`` (a Pareto front at no
extra model cost), or a finished table (``table=`` object or path) to skip the model work.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch

from .. import distributed as dd
from ..models import get_adapter
from ..names import loaded_model_name
from ..policy import Policy
from ..rankers import resolve_for_model
from ..rankers.base import rerank_layers
from .certify import DEFAULT_CANDIDATES, Certifier, check_candidates
from .cost import Budget, CostModel, parse_budget
from .divergence import PreparedSample, prepare_samples, reference_shape
from .result import BudgetResult, SearchResult, priced, unpruned_note
from .robust import DEFAULT_AGGREGATE, check_aggregate
from .spaces.solver import Solution, Solver
from .spaces import DEFAULT_DRAW, Space, check_draw, make_space
from .table import DivergenceTable, build_table, samples_fingerprint
from .verify import Candidates, SampleSet, measure


def _ranker_key(ranker) -> str:
    return ranker if isinstance(ranker, str) else f"callable:{getattr(ranker, 'name', getattr(ranker, '__name__', '?'))}"


@dataclass
class _Setup:
    """What the steps of one search share, checked before any model work: the parsed budgets
    with their conventions, the resolved ranker, the prepared samples, the space, the cost
    models of both conventions and the table's key."""

    limits: list  # (Budget, convention)
    ranker: object  # as given (a name is recorded in the policies)
    rk: object  # resolved for the model
    prepared: list
    space: Space
    costs: dict
    key: dict

    @property
    def shape(self) -> dict:
        counts, text = reference_shape(self.prepared)
        return {"visual_tokens": counts, "text_tokens": text}


@dataclass(frozen=True)
class SearchConfig:
    """Everything :func:`search` takes besides the model, processor and samples, checked
    when built (an error names the option).

    ``budget``/``budgets``: a fraction of the unpruned decoder FLOPs (``0.14``), absolute
    decoder TFLOPs (``"2.5T"``) or ``"tokens:64"`` (paper convention); fractions and TFLOPs
    use ``convention``. ``space``: a registered space (:data:`~dop.search.spaces.SPACES`),
    built from ``groups``, ``kinds``, ``stride``, ``nv_stride`` and ``min_tokens``.
    ``table``: a :class:`DivergenceTable`, or a path that is resumed if present and
    checkpointed as it fills. ``verify_k``: also measure the true divergence of the chosen
    policy, of ``verify_k`` random feasible ones and of token pruning, on the search's
    samples and, when ``verify_samples`` are given (samples the search did not use), on
    those too (:class:`BudgetResult` ``verification`` and ``heldout``). ``verify_draw``:
    how the random policies are drawn, ``"ordered"`` or ``"uniform"``
    (:func:`~dop.search.spaces.draw_feasible`; recorded as ``verification.draw``).
    ``batch_size``: validation samples per forward while the table fills (same table).
    ``candidates``: the K best policies by proxy are measured (true joint divergence on the
    search samples) and the closest chosen (:mod:`dop.search.certify`; 1: the proxy's
    choice, nothing measured). ``aggregate``: how per-sample divergences become one figure
    in the proxy, the certified choice and the verification, ``"mean"``, ``"median"`` or
    ``"trimmed"`` (:mod:`dop.search.robust`).
    ``meta`` is merged into each policy's ``meta``."""

    budget: Any = None
    budgets: Sequence | None = None
    space: str = "dop"
    ranker: Any = "vispruner"
    groups: Sequence[float] | None = None
    kinds: Sequence[str] | str | None = None
    stride: int = 1
    nv_stride: int | None = None
    min_tokens: int = 0
    convention: str = "dop"
    table: DivergenceTable | str | None = None
    verify_k: int = 0
    verify_samples: Sequence | None = None
    verify_draw: str = DEFAULT_DRAW
    seed: int = 0
    build_prompt: Callable | None = None
    progress: bool = True
    meta: dict | None = None
    naive: bool = False
    batch_size: int = 1
    candidates: int = DEFAULT_CANDIDATES
    aggregate: str = DEFAULT_AGGREGATE

    def __post_init__(self):
        if isinstance(self.verify_k, bool) or not isinstance(self.verify_k, int) or self.verify_k < 0:
            raise ValueError(f"verify must be a non-negative integer, got {self.verify_k!r}")
        check_draw(self.verify_draw)
        check_candidates(self.candidates)
        check_aggregate(self.aggregate)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size!r}")
        if not isinstance(self.space, str):
            raise ValueError(f"space must be the name of a search space, got {self.space!r}")

    @property
    def specs(self) -> list:
        """Every budget given, ``budget`` first."""
        return ([] if self.budget is None else [self.budget]) + list(self.budgets or [])

    def space_options(self) -> dict:
        """The options :func:`~dop.search.spaces.make_space` builds the space from."""
        return dict(groups=self.groups, kinds=self.kinds, min_tokens=self.min_tokens, stride=self.stride,
                    nv_stride=self.nv_stride)


def search(model, processor, samples: Sequence, budget=None, *, config: SearchConfig | None = None,
           **options) -> SearchResult:
    """Find the policy of the configured space closest to the unpruned model (summed
    first-token KL proxy) under each budget.

    ``config``: a :class:`SearchConfig`; ``budget`` and keyword ``options`` (its fields:
    ``budgets=``, ``space=``, ``ranker=``, ``table=``, ``verify_k=``, ...) build one, or
    replace fields of the one given.
    """

    t0 = time.perf_counter()
    if budget is not None:
        options["budget"] = budget
    cfg = replace(config, **options) if config is not None else SearchConfig(**options)
    torch.manual_seed(cfg.seed)
    setup = _setup(model, processor, samples, cfg)
    heldout = _heldout(model, processor, cfg.verify_samples, cfg.build_prompt, cfg.verify_k, setup.prepared)
    t_table = time.perf_counter()
    tab = _filled_table(model, setup.prepared, setup.space, setup.rk, setup.key, cfg.table, cfg.progress, cfg.naive,
                        cfg.batch_size)
    t_table = time.perf_counter() - t_table
    info = {"model": setup.key["model"], "ranker": setup.key["ranker"], "samples": len(setup.prepared),
            "seed": cfg.seed, "space": setup.space.name, **(cfg.meta or {})}
    t_certify = time.perf_counter()
    insample = SampleSet.of(model, setup.prepared) if cfg.candidates > 1 else None  # the verification's too
    certifier = None if insample is None else Certifier(model, insample, setup.rk, cfg.candidates, cfg.aggregate,
                                                        cfg.progress)
    solvers, results = _solve_all(setup, tab, info, certifier, cfg.aggregate)
    t_certify = time.perf_counter() - t_certify
    t_verify = time.perf_counter()
    if cfg.verify_k:
        _verify_all(model, setup, results, solvers, (cfg.verify_k, cfg.verify_draw), (insample, heldout), cfg.seed,
                    cfg.progress, cfg.aggregate)
    t_verify = time.perf_counter() - t_verify if cfg.verify_k else 0.0
    return SearchResult(setup.space.name, results, time.perf_counter() - t0, setup.shape, tab.layer_evals,
                        tab.naive_layer_evals, table=tab, space=setup.space, table_s=t_table, verify_s=t_verify,
                        heldout_samples=len(heldout) if heldout else 0, certify_s=t_certify,
                        certify_evaluations=certifier.evaluations if certifier else 0,
                        certify_layer_evals=certifier.layer_evals * len(setup.prepared) if certifier else 0,
                        aggregate=cfg.aggregate)


def _setup(model, processor, samples, cfg: SearchConfig) -> _Setup:
    """Every argument checked (budgets, ranker, convention, token counts) and the samples
    prepared, before any divergence is measured."""
    specs, ranker, convention = cfg.specs, cfg.ranker, cfg.convention
    if not specs:
        raise ValueError("give a budget (e.g. budget=0.14) or budgets=[...]")
    parsed = [parse_budget(b) for b in specs]
    L = get_adapter(model).num_layers
    rk = resolve_for_model(ranker, L)  # unknown names fail before any work
    rerank = rerank_layers(rk)
    prepared = _prepared(model, processor, samples, cfg.build_prompt)
    if not prepared:
        raise ValueError("search: no samples")
    counts, text = reference_shape(prepared)
    sp = make_space(cfg.space, L, max(counts), min_depth=rerank[0] + 1 if rerank else 0, **cfg.space_options())
    costs = {c: CostModel(model, counts, text, c) for c in ("dop", "paper")}
    if convention not in costs:
        raise ValueError(f"convention must be 'dop' or 'paper', got {convention!r}")
    limits = [(b, b.convention(convention)) for b in parsed]
    for b, conv in limits:
        b.limit(costs[conv])  # token counts out of range fail before any work
    key = {"model": loaded_model_name(model) or type(model).__name__, "ranker": _ranker_key(ranker),
           "samples": len(prepared), "fingerprint": samples_fingerprint(prepared), **sp.key()}
    return _Setup(limits, ranker, rk, prepared, sp, costs, key)


def _prepared(model, processor, samples, build_prompt) -> list[PreparedSample]:
    """``samples`` as :class:`PreparedSample` (prepared already, or prepared here)."""
    samples = list(samples)
    if not samples or isinstance(samples[0], PreparedSample):
        return samples
    return prepare_samples(model, processor, samples, build_prompt)


def _heldout(model, processor, samples, build_prompt, verify_k: int, searched: list) -> list | None:
    """The held-out samples prepared (None without any); a warning when some of them are
    samples the search ran on, which would make the held-out figures partly in-sample."""
    if samples is None:
        return None
    if not verify_k:
        raise ValueError("verify_samples applies only together with verify_k > 0")
    prepared = _prepared(model, processor, samples, build_prompt)
    if not prepared:
        raise ValueError("search: verify_samples holds no samples")
    seen = {samples_fingerprint([s]) for s in searched}
    shared = sum(samples_fingerprint([s]) in seen for s in prepared)
    if shared:
        warnings.warn(f"{shared} of the {len(prepared)} held-out samples are also search samples; "
                      "their held-out figures are partly in-sample", stacklevel=3)
    return prepared


def _solve_all(setup: _Setup, tab: DivergenceTable, info: dict, certifier: Certifier | None = None,
               how: str = DEFAULT_AGGREGATE) -> tuple[dict, list[BudgetResult]]:
    """One solver per convention over the table's proxy (each entry's samples aggregated by
    ``how``), and the chosen policy per budget (certified by ``certifier`` when given)."""
    proxy = tab.proxy(setup.space, how)
    solvers = {conv: Solver(setup.space, proxy, setup.costs[conv]) for conv in dict.fromkeys(c for _, c in setup.limits)}
    if certifier is not None:  # every budget's candidates measured together
        certifier.prefetch([(solvers[conv], b.limit(setup.costs[conv]), b.spec) for b, conv in setup.limits
                            if b.limit(setup.costs[conv]) < setup.costs[conv].unpruned])
    results = [_solve_budget(b, conv, solvers[conv], setup.costs, setup.space, setup.ranker, info, certifier)
               for b, conv in setup.limits]
    return solvers, results


def _filled_table(model, prepared, sp, rk, key, table, progress, naive, batch_size) -> DivergenceTable:
    """The divergence table of ``key``: the one given if complete (its key checked), else
    built or resumed (a path is resumed if present and checkpointed as it fills)."""
    path = table if isinstance(table, str) else None
    tab = table if isinstance(table, DivergenceTable) else None
    if tab is None or not tab.complete or dd.is_distributed():  # the ranks pool their checkpoints there
        return build_table(model, prepared, sp, rk, key, table=tab, path=path, progress=progress, naive=naive,
                           batch_size=batch_size)
    tab.check_key(key)
    return tab


def _solve_budget(b: Budget, conv: str, solver: Solver, costs: dict, sp: Space, ranker, info: dict,
                  certifier: Certifier | None = None) -> BudgetResult:
    """The chosen policy at one budget (the unpruned model, said so, when the budget allows
    its cost), with its provenance and FLOPs in both conventions."""
    cost = costs[conv]
    limit = b.limit(cost)
    note = unpruned_note(cost, limit, conv)
    if note:
        sol = Solution(sp.unpruned_assign(), 0.0, cost.unpruned, limit, Policy.unpruned(sp.num_layers), conv)
    elif certifier is None:
        sol = solver.solve(limit, b.spec)
    else:
        sol = certifier(solver, limit, b.spec)
    certified = certifier.records.get(b.spec) if certifier and not note else None
    meta = {"model": info["model"], "ranker": info["ranker"], "budget": b.spec, "budget_convention": conv,
            **{k: info[k] for k in ("samples", "seed", "space")},
            "params": dict(sol.assign), "predicted_divergence": sol.predicted,
            **{k: v for k, v in info.items() if k not in ("model", "ranker", "samples", "seed", "space")}}
    if certified:
        meta["certified"] = certified.meta()
    return priced(b, conv, limit, sol.policy, costs, ranker, meta, note, params=sol.assign, predicted=sol.predicted,
                  solution=sol, certified=certified)


def _verify_all(model, setup: _Setup, results: list[BudgetResult], solvers: dict, drawn: tuple[int, str],
                samples: tuple, seed: int, progress: bool, how: str = DEFAULT_AGGREGATE) -> None:
    """The true divergence of each chosen policy, of ``k`` random feasible ones (``drawn``:
    ``(k, draw)``) and of token pruning, on the search's samples and on the held-out ones
    (``samples``: the in-sample :class:`SampleSet` of the certified choice or None, and the
    held-out samples or None; the same policies on both), each aggregated by ``how``; recorded in each result and its policy's
    meta. The candidates of a certified choice are measured on the held-out samples too."""
    k, draw = drawn
    insample, heldout = samples
    sets = {"in-sample": insample or SampleSet.of(model, setup.prepared)}
    if heldout:
        sets["held-out"] = SampleSet.of(model, heldout)
    for res in results:
        cand = Candidates.draw(setup.space, solvers[res.solution.convention], res.solution, k, seed, draw)
        got = {name: measure(model, ss, cand, setup.rk, progress, desc=f"verify {name}", how=how)
               for name, ss in sets.items()}
        if res.certified and heldout:
            res.certified.measure_heldout(model, sets["held-out"], setup.rk)
        res.verification, res.heldout = got["in-sample"], got.get("held-out")
        extra = {"true_divergence": res.verification.chosen_true}
        if res.heldout is not None:
            extra.update(heldout_true_divergence=res.heldout.chosen_true, heldout_samples=res.heldout.num_samples)
        res.policy = res.policy.with_meta(**extra)
