"""The K best distinct feasible policies of a space under one limit, by summed proxy over the
same table as :meth:`~dop.search.spaces.solver.Solver.solve` (docs/design.md, "Certified
choice").

Each space's solver enumerates its best assignments (:meth:`Solver.ranked`): ``dop`` sorts
its priced grid in the order its solver breaks ties; ``multigroup`` runs its dynamic
programme keeping the first K Pareto layers per state, which loses none of the K best
(docs/design.md, "Certified choice", has the argument); a small grid of another space is
enumerated outright. This module keeps the first K that behave differently.

Distinct means distinct in behaviour (:func:`behaviour_key`): several assignments can make
the same policy (``dop``: ``n_v`` at ``--min-tokens`` leaves the depths nothing to apply to,
and two segments with the same depths are one), and count once, at their best proxy.
"""

from __future__ import annotations

from .spaces.solver import Solution, Solver


def behaviour_key(policy) -> tuple:
    """What a depth policy does, independent of how its groups are cut: the runs of adjacent
    groups with the same depth for every kind merged (the upper fraction of each run and its
    depths). Two policies with the same key process every token of every image alike."""
    kinds = sorted(policy.depth)
    runs: list[tuple[float, tuple]] = []
    for g, f in enumerate(policy.groups):
        d = tuple(policy.depth[k][g] for k in kinds)
        if runs and runs[-1][1] == d:
            runs[-1] = (f, d)
        else:
            runs.append((f, d))
    return policy.num_layers, tuple(kinds), tuple(runs), tuple(sorted(policy.skip.items()))


def k_best(solver: Solver, limit: int, k: int, budget_text: str = "") -> list[Solution]:
    """The ``k`` feasible policies of ``solver``'s space with the least summed proxy, distinct
    in behaviour, best first (fewer where the space holds fewer). The first is exactly
    :meth:`Solver.solve`'s choice (a :class:`~dop.search.cost.BudgetError` where nothing fits)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"candidates must be a positive integer, got {k!r}")
    first = solver.solve(limit, budget_text)
    if k == 1:
        return [first]
    n = k
    while True:  # n assignments may make fewer than k distinct policies: ask for more while there are more
        ranked = solver.ranked(limit, n)
        out = _distinct(solver, first, ranked, k, limit)
        if len(out) == k or len(ranked) < n:
            return out
        n *= 2


def _distinct(solver: Solver, first: Solution, ranked, k: int, limit: int) -> list[Solution]:
    """``first``, then the first ``k - 1`` others of ``ranked`` that behave differently."""
    out, seen = [first], {behaviour_key(first.policy)}
    for assign, obj, tot in ranked:
        if len(out) == k:
            break
        sol = solver.solution(assign, obj, tot, limit)
        key = behaviour_key(sol.policy)
        if key not in seen:
            seen.add(key)
            out.append(sol)
    return out
