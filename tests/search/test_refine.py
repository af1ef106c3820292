"""Local refinement by the true joint divergence (dop.search.refine, issue 22): the result is
feasible, never worse than the start on the search samples, a local optimum of its moves
when it stops there, bounded in evaluations, deterministic; bad inputs are refused."""

from __future__ import annotations

import pytest

from dop.search import CostModel, make_space
from dop.search.refine import _moves, refine
from dop.search.spaces import draw_feasible
from dop.search.verify import SampleSet
from tiny_models import build_model, prepared_samples

L = 4
FAMILY = "llava"
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def setup():
    model = build_model(FAMILY, num_layers=L)
    prepared = prepared_samples(model, FAMILY)
    n = prepared[0].visual_counts[0]
    space = make_space("multigroup", L, n, groups=(0.5, 1.0), kinds=("attn", "mlp"))
    cost = CostModel(model, prepared[0].visual_counts, prepared[0].text_tokens)
    limit = int(0.6 * cost.unpruned)
    # a feasible start far below the budget's best: raises and swaps have room to improve
    start = {"attn[0]": 1, "attn[1]": 0, "mlp[0]": 0, "mlp[1]": 1}
    assert cost.policy_cost(space.policy(start)) <= limit
    return model, SampleSet.of(model, prepared), space, cost, limit, start


def _true(model, ss, policy):
    return ss.divergences(model, [(policy, "identity")])[0]


def test_result_is_feasible_and_never_worse_than_the_start(setup):
    model, ss, space, cost, limit, start = setup
    policy, trace = refine(model, ss, space, cost, limit, start, "identity", max_evals=40, batch=3)
    assert cost.policy_cost(policy) <= limit
    assert policy == space.policy(trace.best)
    start_true = _true(model, ss, space.policy(start))
    assert trace.start_true == pytest.approx(start_true, abs=1e-9)
    assert _true(model, ss, policy) == pytest.approx(trace.best_true, abs=1e-9)
    assert trace.best_true < start_true  # this start is far from the best: the climb must gain
    assert trace.rounds >= 1 and trace.gain > 0
    for step in trace.steps:  # every policy measured fits the budget
        assert step["cost"] <= limit and cost.policy_cost(space.policy(step["assign"])) == step["cost"]
    accepted = [s["true"] for s in trace.steps if s["accepted"]]
    assert accepted == sorted(accepted, reverse=True) and accepted[-1] == trace.best_true
    assert len({tuple(sorted(s["assign"].items())) for s in trace.steps}) == len(trace.steps)


def test_stops_at_a_local_optimum_of_its_moves(setup):
    model, ss, space, cost, limit, start = setup
    policy, trace = refine(model, ss, space, cost, limit, start, "identity", max_evals=500)
    assert trace.stopped == "local optimum"
    # every feasible raise, swap or lowering of the result is at least as far from the unpruned model
    moves = _moves(space, trace.best, cost.policy_cost, limit, None)
    assert moves
    trues = ss.divergences(model, [(space.policy(a), "identity") for _, a in moves])
    assert min(trues) >= trace.best_true


@pytest.mark.parametrize("max_evals", [1, 2, 5])
def test_evaluations_are_bounded(setup, max_evals):
    model, ss, space, cost, limit, start = setup
    policy, trace = refine(model, ss, space, cost, limit, start, "identity", max_evals=max_evals, batch=4)
    assert trace.evals == len(trace.steps) <= max_evals
    if max_evals == 1:
        assert trace.best == start and policy == space.policy(start) and trace.stopped == "max_evals"


def test_deterministic_and_ordered_by_the_proxy(setup):
    model, ss, space, cost, limit, start = setup
    a = refine(model, ss, space, cost, limit, start, "identity", max_evals=6, batch=2)[1]
    b = refine(model, ss, space, cost, limit, start, "identity", max_evals=6, batch=2)[1]
    assert a.steps == b.steps
    # with a proxy, each round measures its moves in order of the predicted change
    proxy = {p.name: {v: float(L - v) * (i + 1) for v in p.values} for i, p in enumerate(space.params)}
    t = refine(model, ss, space, cost, limit, start, "identity", max_evals=6, batch=10, proxy=proxy)[1]
    first = [s for s in t.steps if s["round"] == 1]
    pred = [sum(proxy[n][s["assign"][n]] - proxy[n][start[n]] for n in start) for s in first]
    assert len(first) > 1 and pred == sorted(pred)


def test_dop_space_and_prepared_samples(setup):
    model, ss, _, cost, limit, _ = setup
    space = make_space("dop", L, ss.prepared[0].visual_counts[0])
    start = draw_feasible(space, cost.policy_cost, limit, 1, seed=3)[0]
    policy, trace = refine(model, list(ss.prepared), space, cost, limit, start, "identity", max_evals=8)
    assert cost.policy_cost(policy) <= limit and trace.best_true <= trace.start_true
    assert trace.samples == len(ss.prepared) and trace.evals <= 8


@pytest.mark.parametrize("change, match", [
    (dict(max_evals=0), "max_evals must be a positive integer"),
    (dict(batch=0), "batch must be a positive integer"),
    (dict(start={"attn[0]": 4}), "does not match space"),
    (dict(start={"attn[0]": 9, "attn[1]": 0, "mlp[0]": 0, "mlp[1]": 0}), r"attn\[0\]=9 is not a value"),
    (dict(start={"attn[0]": 4, "attn[1]": 4, "mlp[0]": 4, "mlp[1]": 4}), "costs more than the limit"),
])
def test_bad_inputs(setup, change, match):
    model, ss, space, cost, limit, start = setup
    kw = dict(max_evals=4, start=start) | change
    with pytest.raises(ValueError, match=match):
        refine(model, ss, space, cost, limit, kw.pop("start"), "identity", **kw)


def test_moves_are_every_feasible_raise_swap_and_lowering():
    """The neighbourhood against its definition, under a made-up linear price (no model)."""
    space = make_space("multigroup", 8, 16, groups=(0.25, 0.5, 1.0), kinds=("attn", "mlp"), stride=2)
    weights = {p.name: 3 + 2 * i for i, p in enumerate(space.params)}

    def price(policy):
        return sum(weights[f"{k}[{g}]"] * policy.depth[k][g] for k in ("attn", "mlp") for g in range(3))

    cur = {"attn[0]": 6, "attn[1]": 4, "attn[2]": 2, "mlp[0]": 8, "mlp[1]": 3, "mlp[2]": 0}
    grid = {p.name: sorted(set(p.measured) | {p.unpruned}) for p in space.params}
    for limit in (price(space.policy(cur)), price(space.policy(cur)) + 4, price(space.policy(cur)) + 100):
        want = set()
        for n in cur:
            below = [v for v in grid[n] if v < cur[n]]
            if below:
                want.add(tuple(sorted(dict(cur, **{n: below[-1]}).items())))
        for up in cur:
            above = [v for v in grid[up] if v > cur[up]]
            if not above:
                continue
            raised = dict(cur, **{up: above[0]})
            if price(space.policy(raised)) <= limit:
                want.add(tuple(sorted(raised.items())))
                continue
            for down in cur:
                fits = [v for v in grid[down] if v < cur[down] and down != up
                        and price(space.policy(dict(raised, **{down: v}))) <= limit]
                if fits:
                    want.add(tuple(sorted(dict(raised, **{down: max(fits)}).items())))
        got = [a for _, a in _moves(space, cur, price, limit, None)]
        assert all(price(space.policy(a)) <= limit for a in got)
        assert {tuple(sorted(a.items())) for a in got} == want
