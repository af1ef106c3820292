"""Exact K-best (dop.search.kbest): the K best distinct feasible policies by summed proxy
against brute-force enumeration of small spaces, with ties."""

from __future__ import annotations

import random

import pytest

from dop.search import CostModel, Solver, make_space
from dop.search.kbest import behaviour_key, k_best
from dop.search.spaces.solver import pareto_layers
from test_search import SMALL_SPACES, _priced, _random_proxy
from tiny_models import make_config


def _tied_proxy(space, seed):
    """Proxy values from a few levels: many assignments tie."""
    rng = random.Random(seed)
    return {p.name: {v: (0.0 if v == p.unpruned else rng.choice((0.25, 0.5, 1.0))) for v in p.values}
            for p in space.params}


def _brute(rows, proxy, limit):
    """Every feasible policy's best proxy, by behaviour."""
    best = {}
    for a, pol, c in rows:
        key = behaviour_key(pol)
        if c <= limit:
            best[key] = min(best.get(key, float("inf")), sum(proxy[n][v] for n, v in a.items()))
    return best


@pytest.mark.parametrize("name,kw,counts", SMALL_SPACES[:2] + SMALL_SPACES[3:6],
                         ids=lambda x: str(x))
def test_k_best_equals_brute_force(name, kw, counts):
    config = make_config("llava", num_layers=3)
    space = make_space(name, 3, max(counts), **kw)
    cost = CostModel(config, counts, 7)
    rows = _priced(space, cost)
    for proxy in (_random_proxy(space, 1), _tied_proxy(space, 1)):
        solver = Solver(space, proxy, cost)
        for frac in (0.45, 0.8):
            limit = int(frac * cost.unpruned)
            brute = _brute(rows, proxy, limit)
            want = sorted(brute.values())
            for k in (1, 2, 5, 17, 40) + ((len(want) + 3,) if len(want) < 300 else ()):  # all, where few
                got = k_best(solver, limit, k)
                assert got[0].assign == solver.solve(limit).assign  # the first is today's choice
                assert len(got) == min(k, len(want))
                keys = [behaviour_key(s.policy) for s in got]
                assert len(set(keys)) == len(keys)  # distinct policies
                assert [s.predicted for s in got] == pytest.approx(want[:len(got)], abs=1e-12), (k, frac)
                for s, key in zip(got, keys):
                    assert s.cost <= limit
                    assert s.predicted == pytest.approx(brute[key], abs=1e-12)  # each at its best assignment
                    assert s.predicted == pytest.approx(solver.proxy_of(s.assign), abs=1e-12)


def test_pareto_layers():
    import numpy as np

    cost = np.array([1, 1, 2, 3, 3, 4, 5])
    obj = np.array([5.0, 5.0, 4.0, 4.0, 1.0, 1.0, 0.5])
    # layer 1: (1,5) (2,4) (3,1) (5,.5); layer 2: the duplicate (1,5), (3,4), (4,1)
    assert sorted(pareto_layers(1)(cost, obj).tolist()) == [0, 2, 4, 6]
    assert sorted(pareto_layers(2)(cost, obj).tolist()) == list(range(7))
    got = pareto_layers(2)(cost, obj)
    assert list(cost[got]) == sorted(cost[got])  # by cost
    with pytest.raises(ValueError, match="positive"):
        pareto_layers(0)


def test_default_enumeration_of_a_small_grid(monkeypatch):
    """Solver.ranked's default (a space whose solver enumerates nothing itself) prices the
    whole grid: the same list as the dop solver's own enumeration, and a clear error where
    the grid is too large."""
    from dop.search.spaces import solver as solver_module

    config = make_config("llava", num_layers=3)
    space = make_space("dop", 3, 16, min_tokens=3)
    cost = CostModel(config, [16, 16], 7)
    solver = Solver(space, _tied_proxy(space, 2), cost)
    for frac in (0.45, 0.8):
        limit = int(frac * cost.unpruned)
        mine, generic = solver.ranked(limit, 50), Solver.ranked(solver, limit, 50)
        assert [(a, c) for a, _, c in generic] == [(a, c) for a, _, c in mine]
        assert [o for _, o, _ in generic] == pytest.approx([o for _, o, _ in mine], abs=1e-12)
    monkeypatch.setattr(solver_module, "GRID_LIMIT", 10)
    with pytest.raises(ValueError, match="too many to enumerate .* use candidates=1"):
        Solver.ranked(solver, limit, 5)
