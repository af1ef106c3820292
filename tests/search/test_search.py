"""DOP search (issue 5): divergence, table (early start vs naive, resume), exact solver vs
brute force, verification, CLI and every bad input."""

from __future__ import annotations

import copy

import itertools
import json
import random

import pytest
import torch

import dop
from dop.cli import main
from dop.flops import count_flops
from dop.rankers import Ranker
from dop.search import (
    BudgetError, CostModel, DivergenceTable, PreparedSample, SpaceError, Solver, TableError, build_table,
    kl_divergence, make_space, parse_budget, search, true_divergence,
)
from dop.search.spaces import draw_feasible
from dop.runtime.replay import last_logits
from tiny_models import FAMILIES, build_inputs, build_model, make_config

L = 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _prepared(model, family, n=3):
    out = []
    for seed in range(n):
        inputs, counts = build_inputs(model, family, num_images=1, seed=seed)
        out.append(PreparedSample(inputs, counts, int(inputs["input_ids"].shape[1]) - sum(counts)))
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    model = build_model(request.param, num_layers=L)
    return request.param, model, _prepared(model, request.param)


def _float64(model, prepared):
    """A float64 copy of ``model`` and its samples: batched and one-by-one computations then
    agree to ~1e-15 relative, so tables compared to 1e-10 test the arithmetic, not rounding
    (float32 rounding moves a first-token KL of ~1e-6 by ~1e-8)."""
    model = copy.deepcopy(model).double()
    out = []
    for s in prepared:
        inputs = {k: (v.double() if v.is_floating_point() else v) for k, v in s.inputs.items()}
        out.append(PreparedSample(inputs, s.visual_counts, s.text_tokens))
    return model, out


def _refs(model, prepared):
    with torch.inference_mode():
        return [last_logits(model, s.inputs) for s in prepared]


def _space(name, prepared, **kw):
    return make_space(name, L, max(prepared[0].visual_counts), **kw)


class NormReranker(Ranker):
    """Re-ranks inside the LLM at layer 1 by hidden-state norm (a FastV-like ranker)."""

    name = "norm-rerank"
    layers = (1,)

    def rank(self, ctx):
        return [torch.arange(s.n) for s in ctx.spans]

    def rerank(self, ctx, state):
        out = []
        for span, act, old in zip(ctx.spans, state.active, state.ranks):
            norms = state.hidden_states[0, span.positions].norm(dim=-1)
            new = torch.argsort(-norms, stable=True)
            if not bool(act.all()):
                return None
            out.append(new)
        return out


# ---------------------------------------------------------------------- divergence
def test_kl_divergence_values():
    x = torch.randn(50)
    assert kl_divergence(x, x) == 0.0
    p, q = torch.tensor([0.5, 0.25, 0.25]), torch.tensor([0.25, 0.5, 0.25])
    want = float((p * (p / q).log()).sum())
    assert kl_divergence(p.log(), q.log()) == pytest.approx(want, rel=1e-6)
    assert kl_divergence(torch.randn(50), torch.randn(50)) > 0


@torch.no_grad()
def test_unpruned_divergence_is_zero(tiny):
    fam, model, prepared = tiny
    refs = _refs(model, prepared)
    for pol in (dop.Policy.unpruned(L), dop.Policy(L, [0.5, 1.0], {"attn": [L, L], "mlp": [L, L]})):
        mean, per = true_divergence(model, prepared, refs, pol, "random")
        assert mean == 0.0 and per == [0.0] * len(prepared)


# ---------------------------------------------------------------------- table
def _key(space, ranker="random:seed=2"):
    return {"test": True, "ranker": str(ranker), **space.key()}


@pytest.mark.parametrize("space_name", ["dop", "multigroup"])
def test_early_start_table_equals_naive(tiny, space_name):
    fam, model, prepared = tiny
    model, prepared = _float64(model, prepared)
    kw = {"nv_stride": 3} if space_name == "dop" else {"groups": [0.25, 0.5, 1.0], "kinds": "attn_q,attn_kv,mlp"}
    sp = _space(space_name, prepared, **kw)
    fast = build_table(model, prepared, sp, "random:seed=2", _key(sp), progress=False)
    slow = build_table(model, prepared, sp, "random:seed=2", _key(sp), progress=False, naive=True)
    worst = max(abs(a - b) for n in fast.entries for v in fast.entries[n]
                for a, b in zip(fast.entries[n][v], slow.entries[n][v]))
    assert worst < 1e-10, f"{fam}: early-start and naive tables differ by {worst:.3g}"
    assert fast.complete and slow.complete
    assert slow.layer_evals == slow.naive_layer_evals
    assert fast.naive_layer_evals == slow.naive_layer_evals
    assert fast.layer_evals < fast.naive_layer_evals
    assert any(x > 1e-6 for vals in fast.entries.values() for per in vals.values() for x in per)


def test_batched_candidates_whose_depths_change_where_the_handles_do_not(tiny):
    """replay_candidates: candidates whose depths change at layers where the applied policy
    has no depth boundary (its row cache would hold the rows of an earlier layer) each give
    the logits of their own full pruned forward, on a padded batch of two prompts."""
    from dop.runtime import apply_policy
    from dop.runtime.replay import batch_last_logits, capture_prefix, capture_ranks
    from dop.search.candidates import candidate_depths, replay_candidates
    from dop.batching import collated

    fam, model, prepared = tiny
    model, prepared = _float64(model, prepared)
    inputs = collated(model, [prepared[0].inputs, prepared[1].inputs])
    start, ranker = 1, "random:seed=2"
    handle_policy = dop.Policy(L, [1.0], {"mlp": [start]})
    cands = [dop.Policy(L, [0.5, 1.0], {"mlp": [L, L - 1], "attn": [start + 1, L]}),
             dop.Policy(L, [1.0], {"attn_kv": [L - 1]}), handle_policy]
    prefix, ranks = capture_prefix(model, inputs), capture_ranks(model, inputs, ranker)
    states = [candidate_depths(model, prefix, p, ranker, ranks, start) for p in cands]
    with apply_policy(model, handle_policy, ranker=ranker) as h:
        got = replay_candidates(h, prefix, states, start)
    for p, q in zip(cands, got):
        with apply_policy(model, p, ranker=ranker):
            want = batch_last_logits(model, inputs)
        assert torch.allclose(q, want, rtol=0, atol=1e-10), (fam, p)


def test_early_start_with_reranking_ranker():
    """A ranker that re-ranks inside the LLM: depths start past its layer, ranks recorded by
    the probe forward, re-ranking at later layers done by the wrapped layers."""
    model = build_model("llava", num_layers=L)
    prepared = _prepared(model, "llava", 2)
    ranker = NormReranker()
    sp = _space("multigroup", prepared, groups=[0.5, 1.0], min_depth=2)
    assert sp.param("attn[0]").measured == [2, 3]
    fast = build_table(model, prepared, sp, ranker, _key(sp, "norm"), progress=False)
    slow = build_table(model, prepared, sp, ranker, _key(sp, "norm"), progress=False, naive=True)
    for n in fast.entries:
        for v in fast.entries[n]:
            assert fast.entries[n][v] == pytest.approx(slow.entries[n][v], abs=1e-6)
    spd = _space("dop", prepared, nv_stride=4, min_depth=2)
    a = build_table(model, prepared, spd, ranker, _key(spd, "norm"), progress=False)
    b = build_table(model, prepared, spd, ranker, _key(spd, "norm"), progress=False, naive=True)
    assert a.entries["n_v"][4] == pytest.approx(b.entries["n_v"][4], abs=1e-6)


def test_proxy_equals_truth_for_one_parameter(tiny):
    fam, model, prepared = tiny
    model, prepared = _float64(model, prepared)
    sp = _space("dop", prepared, nv_stride=5)
    table = build_table(model, prepared, sp, "random:seed=1", _key(sp), progress=False)
    refs = _refs(model, prepared)
    solver = Solver(sp, table.proxy(sp), CostModel(model, prepared[0].visual_counts, prepared[0].text_tokens))
    for name, value in (("n_v", 5), ("D_attn", 1), ("D_mlp", 2), ("D_attn", 0)):
        assign = {**sp.unpruned_assign(), name: value}
        truth, _ = true_divergence(model, prepared, refs, sp.policy(assign), "random:seed=1")
        assert solver.proxy_of(assign) == pytest.approx(truth, rel=1e-6, abs=1e-9)
    assert solver.proxy_of(sp.unpruned_assign()) == 0.0


def test_stride_interpolates_between_measured_depths():
    sp = make_space("multigroup", 8, 16, groups=[0.5, 1.0], stride=3)
    p = sp.param("mlp[1]")
    assert p.measured == [0, 3, 6] and p.values == list(range(9))
    got = p.interpolate({0: 3.0, 3: 1.5, 6: 0.6})
    assert got[0] == 3.0 and got[3] == 1.5 and got[8] == 0.0
    assert got[1] == pytest.approx(2.5) and got[7] == pytest.approx(0.3)


def test_resume_after_interruption_gives_the_same_table(tmp_path):
    model = build_model("qwen2_5_vl", num_layers=L)
    prepared = _prepared(model, "qwen2_5_vl", 2)
    sp = _space("dop", prepared, nv_stride=4)
    key = _key(sp)
    whole = build_table(model, prepared, sp, "random:seed=2", key, progress=False)
    path = str(tmp_path / "table.json")

    def stop(done):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_table(model, prepared, sp, "random:seed=2", key, path=path, progress=False, on_entry=stop)
    saved = DivergenceTable.load(path)
    assert saved.total() - saved.missing() == 5
    resumed = build_table(model, prepared, sp, "random:seed=2", key, path=path, progress=False)
    assert resumed.entries == whole.entries
    assert DivergenceTable.load(path).entries == whole.entries
    # the file of another search is refused, naming the difference
    with pytest.raises(TableError, match="ranker"):
        build_table(model, prepared, sp, "identity", _key(sp, "identity"), path=path, progress=False)


# ---------------------------------------------------------------------- solver
def _priced(space, cost):
    """Every assignment of ``space`` with its policy and the policy's exact cost."""
    names = [p.name for p in space.params]
    rows = []
    for combo in itertools.product(*(p.values for p in space.params)):
        a = dict(zip(names, combo))
        pol = space.policy(a)
        rows.append((a, pol, count_flops(cost.model, pol, num_visual_tokens=cost.counts, num_text_tokens=cost.text,
                                         convention=cost.convention).decoder))
    return rows


def _brute(space, proxy, cost):
    return [(sum(proxy[n][v] for n, v in a.items()), c) for a, _, c in _priced(space, cost)]


def _random_proxy(space, seed):
    rng = random.Random(seed)
    return {p.name: {v: (0.0 if v == p.unpruned else rng.random() ** 2 * (1 + p.unpruned - v))
                     for v in p.values} for p in space.params}


SMALL_SPACES = [
    ("dop", {}, [16]),
    ("dop", {"min_tokens": 3}, [16, 16]),
    ("dop", {"min_depth": 1}, [16]),
    ("multigroup", {"groups": [0.25, 0.5, 1.0]}, [16]),
    ("multigroup", {"groups": [0.5, 1.0], "kinds": "attn_q,attn_kv,mlp"}, [16]),
    ("multigroup", {"groups": [0.25, 1.0], "kinds": "attn_kv,mlp", "min_tokens": 2}, [12, 16]),
    ("multigroup", {"groups": [0.25, 0.5, 1.0], "kinds": "attn_q"}, [16]),
]


@pytest.mark.parametrize("convention", ["dop", "paper"])
@pytest.mark.parametrize("name,kw,counts", SMALL_SPACES, ids=lambda x: str(x))
def test_solver_equals_brute_force(name, kw, counts, convention):
    config = make_config("llava", num_layers=3)
    space = make_space(name, 3, max(counts), **kw)
    cost = CostModel(config, counts, 7, convention)
    for seed in range(2):
        proxy = _random_proxy(space, seed)
        solver = Solver(space, proxy, cost)
        rows = _brute(space, proxy, cost)
        cheapest = min(c for _, c in rows)
        assert solver.cheapest() == cheapest
        for frac in (0.3, 0.45, 0.6, 0.8, 1.0):
            limit = int(frac * cost.unpruned)
            feasible = [o for o, c in rows if c <= limit]
            if not feasible:
                with pytest.raises(BudgetError, match="cheapest"):
                    solver.solve(limit)
                continue
            sol = solver.solve(limit)
            assert sol.predicted == pytest.approx(min(feasible), abs=1e-12), (name, kw, frac)
            assert sol.cost <= limit
            assert count_flops(config, sol.policy, num_visual_tokens=counts, num_text_tokens=7,
                               convention=convention).decoder == sol.cost


def test_infeasible_budget_names_the_cheapest_figure():
    config = make_config("llava", num_layers=3)
    space = make_space("dop", 3, 16, min_tokens=8)
    cost = CostModel(config, [16], 7)
    solver = Solver(space, _random_proxy(space, 0), cost)
    with pytest.raises(BudgetError, match=r"cheapest policy .* costs .*raise the budget to at least 0\.\d+"):
        solver.solve(int(0.05 * cost.unpruned), "0.05")


@pytest.mark.parametrize("draw", ["uniform", "ordered"])
def test_random_feasible_policies_fit_the_budget(draw):
    config = make_config("llava", num_layers=3)
    space = make_space("multigroup", 3, 16)
    cost = CostModel(config, [16], 7)
    limit = int(0.5 * cost.unpruned)
    got = draw_feasible(space, cost.policy_cost, limit, 20, seed=3, draw=draw)
    assert len(got) == 20 and len({tuple(sorted(a.items())) for a in got}) == 20
    assert all(cost.policy_cost(space.policy(a)) <= limit for a in got)


@pytest.mark.parametrize("groups", [[0.25, 0.5, 1.0], [0.125, 0.25, 0.5, 1.0]])
def test_draws_of_random_policies(groups):
    """draw_feasible: "ordered" (the default) keeps each kind's depths non-increasing over
    the rank groups; "uniform" does not."""
    config = make_config("llava", num_layers=6)
    space = make_space("multigroup", 6, 16, groups=groups)
    cost = CostModel(config, [16], 7)
    limit = int(0.4 * cost.unpruned)
    got = draw_feasible(space, cost.policy_cost, limit, 30, seed=5)
    assert got == draw_feasible(space, cost.policy_cost, limit, 30, seed=5, draw="ordered")
    assert len(got) == 30 and len({tuple(sorted(a.items())) for a in got}) == 30
    assert all(cost.policy_cost(space.policy(a)) <= limit for a in got)
    G = len(groups)
    for a in got:
        for k in ("attn", "mlp"):
            depths = [a[f"{k}[{g}]"] for g in range(G)]
            assert depths == sorted(depths, reverse=True), a
    uniform = draw_feasible(space, cost.policy_cost, limit, 30, seed=5, draw="uniform")
    assert any(a[f"attn[{G - 1}]"] > a["attn[0]"] for a in uniform)  # the uniform draw is not ordered
    with pytest.raises(SpaceError, match="unknown draw"):
        draw_feasible(space, cost.policy_cost, limit, 3, draw="sorted")


# ---------------------------------------------------------------------- API
def test_one_table_serves_several_budgets():
    model = build_model("llava", num_layers=L)
    prepared = _prepared(model, "llava", 2)
    first = search(model, None, prepared, budgets=[0.9, 0.8], ranker="random", progress=False, nv_stride=4)
    evals = first.table.layer_evals
    again = search(model, None, prepared, budgets=[0.95, 0.9, "tokens:4", "85%"], ranker="random",
                   table=first.table, progress=False, nv_stride=4)
    assert again.table.layer_evals == evals  # no model work for a finished table
    assert again.results[1].policy.to_dict()["depth"] == first.results[0].policy.to_dict()["depth"]
    preds = [r.solution.predicted for r in again.results[:2]]
    assert preds[0] <= preds[1]
    for r in again.results:
        assert r.flops["dop" if r.budget.kind != "tokens" else "paper"]["after"] <= r.solution.limit
        assert r.policy.meta["budget"] == r.budget.spec and r.policy.meta["samples"] == 2
    assert first.layer_evals < first.naive_layer_evals


# ---------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("spec,match", [
    ("1.5", r"must lie in \(0, 1\]; for absolute TFLOPs write 1.5T"),
    ("0", r"must lie in \(0, 1\]"),
    ("cheap", "not understood"),
    ("tokens:5/3", "token share"),
    ("-2T", "not understood"),
    (True, "budget must be"),
])
def test_bad_budget(spec, match):
    with pytest.raises(BudgetError, match=match):
        parse_budget(spec)


def test_token_budget_beyond_the_image():
    cost = CostModel(make_config("llava", num_layers=3), [16], 7, "paper")
    with pytest.raises(BudgetError, match="hold 16 visual tokens"):
        parse_budget("tokens:17").limit(cost)


def test_token_budget_counts_tokens():
    assert parse_budget("tokens:12").tokens(144) == 12
    assert parse_budget("tokens:1/4").tokens(144) == 36
    with pytest.raises(BudgetError, match="not a token count"):
        parse_budget("0.5").tokens(144)


@pytest.mark.parametrize("name,kw,match", [
    ("tokens", {}, "unknown search space 'tokens'"),
    ("dop", {"groups": [0.5, 1.0]}, "multigroup only"),
    ("multigroup", {"nv_stride": 2}, "dop only"),
    ("multigroup", {"groups": [0.5, 0.25, 1.0]}, "strictly increasing"),
    ("multigroup", {"groups": [0.5]}, "ending with 1"),
    ("multigroup", {"kinds": "attn,attn_q"}, "may not be combined"),
    ("multigroup", {"kinds": "ffn"}, "unknown op kind"),
    ("dop", {"min_tokens": 16}, "min-tokens must be an integer in"),
    ("dop", {"stride": 0}, "stride must be an integer in"),
    ("dop", {"min_depth": 4}, "leaves no depth"),
])
def test_bad_space(name, kw, match):
    with pytest.raises(SpaceError, match=match):
        make_space(name, 4, 16, **kw)


# ---------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from fixtures_eval import build_tiny_llava, write_jsonl_dataset

    root = tmp_path_factory.mktemp("search")
    model = build_tiny_llava(root / "tiny")
    rows = [{"question": "what color is the circle ?", "answers": ["red"], "colour": (30 * i, 90, 200 - 20 * i)}
            for i in range(4)]
    data = write_jsonl_dataset(root / "data", rows)
    return root, str(model), str(data)


def test_cli_search_verify_and_transfer(saved, capsys):
    root, model, data = saved
    out, table = root / "p.json", root / "t.json"
    args = ["search", "--model", model, "--data", data, "--samples", "3", "--budgets", "0.9,tokens:8",
            "--ranker", "random", "--no-progress", "--threads", "1", "-o", str(out), "--table", str(table),
            "--seed", "3"]
    assert main(args + ["--verify", "4", "--json", str(root / "s.json")]) == 0
    text = capsys.readouterr().out
    for needle in ("parameters: n_v=", "decoder FLOPs (dop)", "decoder MACs (paper)", "predicted divergence",
                   "true divergence", "Spearman", "token pruning at the same budget", "decoder-layer evaluations",
                   "blind policy (no visual operation at all)", "wall time"):
        assert needle in text, needle
    pol = dop.Policy.from_json(str(root / "p.0.9.json"))
    assert pol.meta["model"] == model and pol.meta["ranker"] == "random" and pol.meta["budget"] == "0.9"
    assert pol.meta["samples"] == 3 and pol.meta["seed"] == 3 and pol.ranker == "random"
    assert (root / "p.tokens-8.json").is_file()
    doc = json.loads((root / "s.json").read_text())
    assert doc["layer_evals"] < doc["naive_layer_evals"]
    v = doc["results"][0]["verification"]
    # the blind reference is the policy that prunes every visual op of every layer, and the
    # count of random policies at least as far from the unpruned model follows from it
    assert v["blind_true"] > 0
    assert v["n_at_least_blind"] == sum(r["true"] >= v["blind_true"] * (1 - 1e-6) for r in v["random"])
    # a finished table: new budgets cost no model work
    before = DivergenceTable.load(str(table)).layer_evals
    assert main(args[:8] + ["0.8"] + args[9:]) == 0
    assert DivergenceTable.load(str(table)).layer_evals == before
    # transfer
    assert main(["transfer", str(root / "p.0.9.json"), "--num-layers", "8", "-o", str(root / "p8.json")]) == 0
    moved = dop.Policy.from_json(str(root / "p8.json"))
    assert moved.num_layers == 8 and moved.meta["transferred_from_layers"] == 2


@pytest.mark.parametrize("extra,match", [
    (["--data", "nosuch:val"], "unknown data set"),
    (["--data", "/nonexistent/x.jsonl"], "not found"),
    (["--budget", "2"], "must lie in"),
    (["--budget", "0.01"], "infeasible.*cheapest"),
    (["--space", "multigroup", "--kinds", "attn,attn_kv"], "may not be combined"),
    (["--groups", "0.5,1"], "multigroup only"),
    (["--ranker", "nosuch"], "unknown ranker"),
    (["--samples", "0"], "positive integer"),
    (["-o", "/nonexistent/dir/p.json"], "does not exist"),
    (["--min-tokens", "99"], "min-tokens"),
])
def test_cli_bad_inputs(saved, capsys, extra, match):
    import re

    root, model, data = saved
    base = {"--model": model, "--data": data, "--budget": "0.9", "-o": str(root / "bad.json"),
            "--ranker": "random"}
    for k, v in zip(extra[::2], extra[1::2]):
        base[k] = v
    argv = ["search", "--samples", "2", "--no-progress", "--threads", "1"]
    if "--samples" in base:
        argv = ["search", "--no-progress"]
    for k, v in base.items():
        argv += [k, v]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err


def test_cli_transfer_errors(tmp_path, capsys):
    assert main(["transfer", str(tmp_path / "none.json"), "--num-layers", "8"]) == 2
    assert "no such file" in capsys.readouterr().err
    p = tmp_path / "p.json"
    dop.Policy(4, [1.0], {"attn": [2]}).to_json(p)
    assert main(["transfer", str(p), "--num-layers", "0"]) == 2
    assert "positive integer" in capsys.readouterr().err


def test_min_tokens_group_is_never_skipped():
    sp = make_space("multigroup", 4, 16, groups=[0.125, 0.25, 0.5, 1.0], min_tokens=3)
    pol = sp.policy({p.name: 0 for p in sp.params})
    assert pol.groups[0] == 3 / 16 and [pol.kind_depths(k)[0] for k in ("attn_q", "attn_kv", "mlp")] == [4, 4, 4]
    assert all(pol.tokens_processed(k, 3, 16) == 3 for k in ("attn_q", "attn_kv", "mlp"))
    assert [p.name for p in sp.params][:3] == ["attn[0]", "attn[1]", "attn[2]"]  # 0.125*16 = 2 <= 3 dropped
    d = make_space("dop", 4, 16, min_tokens=3).policy({"n_v": 8, "D_attn": 0, "D_mlp": 0})
    assert d.groups == (3 / 16, 0.5, 1.0) and d.depth == {"attn": (4, 0, 0), "mlp": (4, 0, 0)}


def test_search_is_deterministic_for_a_seed():
    model = build_model("internvl", num_layers=L)
    prepared = _prepared(model, "internvl", 2)

    def run():
        r = search(model, None, prepared, budget=0.9, space="multigroup", ranker="random", progress=False,
                   verify_k=3, seed=5, groups=[0.5, 1.0])
        d = r.to_dict()
        for k in ("wall_s", "table_s", "verify_s", "certify_s"):
            d.pop(k)
        return d, r.table.entries

    assert run() == run()


def test_summary_warns_when_the_choice_is_worse_than_token_pruning_or_blind():
    """The summary says so when the verified choice is further from the unpruned model than
    token pruning at the same FLOPs or than the blind policy, and stays quiet otherwise."""
    import argparse

    from dop.commands.search import format_summary
    from dop.search import search
    from dop.search.verify import Verification

    model = build_model("llava", num_layers=2)
    inputs, _ = build_inputs(model, "llava")
    from dop.search.divergence import PreparedSample
    from dop.models import get_adapter

    counts = [sp.n for sp in get_adapter(model).image_spans(inputs["input_ids"], inputs)]
    prep = [PreparedSample(dict(inputs), counts, int(inputs["input_ids"].shape[1]) - sum(counts))]
    res = search(model, None, prep, budget=0.9, ranker="spatial", progress=False)
    args = argparse.Namespace(model="m", data="d", ranker="spatial", seed=0, table=None)
    r = res.results[0]
    tp = {"n_keep": 3, "true": 0.5}
    r.verification = Verification(0.1, 0.1, [{"proxy": 0.0, "true": 0.2}], None, None, tp, 1.0)
    assert "warning" not in format_summary(res, args, ["p.json"], 1.0)
    r.verification = Verification(0.7, 0.1, [{"proxy": 0.0, "true": 0.2}], None, None, tp, 1.0)
    text = format_summary(res, args, ["p.json"], 1.0)
    assert "warning: the chosen policy is further from the unpruned model than token pruning" in text
    assert "blind policy (no visual operation at all): true divergence 1; 0 of 1 random policies" in text
    r.verification = Verification(1.5, 0.1, [{"proxy": 0.0, "true": 1.2}], None, None, tp, 1.0)
    text = format_summary(res, args, ["p.json"], 1.0)
    assert "than token pruning at the same budget and the blind policy" in text and "1 of 1 random" in text


def test_verification_counts_and_ranks_against_the_blind_policy():
    from dop.search.verify import Verification

    rows = [{"proxy": p, "true": t} for p, t in [(0.1, 0.1), (0.2, 0.3), (0.3, 0.2), (0.4, 0.5), (0.0, 2.0)]]
    v = Verification(0.1, 0.1, rows, None, None, None, 1.0)
    assert v.n_at_least_blind == 1 and len(v.closer_than_blind()) == 4
    assert v.spearman_below_blind == pytest.approx(0.8)  # ranks 1,2,3,4 vs 1,3,2,4
    assert v.to_dict()["spearman_below_blind"] == v.spearman_below_blind
    none = Verification(0.1, 0.1, rows, None, None, None, None)
    assert none.n_at_least_blind is None and none.spearman_below_blind is None and none.closer_than_blind() == []


@pytest.mark.parametrize("space_name", ["dop", "multigroup"])
def test_batched_table_equals_batch_size_one(tiny, space_name):
    """`dop search --batch-size N`: samples of different lengths padded together give the same
    table (1e-6) and the same per-sample layer counts as one sample at a time."""
    fam, model, _ = tiny
    prepared = []
    for seed, text_len in enumerate((6, 2, 9)):
        inputs, counts = build_inputs(model, fam, num_images=1, seed=seed, text_len=text_len)
        prepared.append(PreparedSample(inputs, counts, int(inputs["input_ids"].shape[1]) - sum(counts)))
    model, prepared = _float64(model, prepared)  # the table's KLs (~1e-6 here) are compared to 1e-10
    kw = {"nv_stride": 3} if space_name == "dop" else {"groups": [0.25, 0.5, 1.0], "kinds": "attn_q,attn_kv,mlp"}
    sp = _space(space_name, prepared, **kw)
    for ranker in ("random:seed=2", "fastv:K=1"):
        if ranker.startswith("fastv") and space_name == "multigroup":
            continue
        one = build_table(model, prepared, sp, ranker, _key(sp, ranker), progress=False)
        two = build_table(model, prepared, sp, ranker, _key(sp, ranker), progress=False, batch_size=2)
        worst = max(abs(a - b) for n in one.entries for v in one.entries[n]
                    for a, b in zip(one.entries[n][v], two.entries[n][v]))
        largest = max(x for n in one.entries for v in one.entries[n] for x in one.entries[n][v])
        assert worst < 1e-10 and largest > 1e-7, f"{fam} {ranker}: tables differ by {worst:.3g} (largest KL {largest:.3g})"
        assert two.complete and (one.layer_evals, one.naive_layer_evals) == (two.layer_evals, two.naive_layer_evals)


@pytest.mark.parametrize("ranker,space_name,kw", [
    (NormReranker(), "dop", {"nv_stride": 4, "min_depth": 2}),  # a probe forward to layer 2
    ("random", "multigroup", {"groups": [0.5, 1.0]}),
])
def test_layer_evals_per_sample_is_what_the_table_spends(ranker, space_name, kw):
    """The count docs/scaling.md prices a search with, before running it."""
    from dop.search.table import layer_evals_per_sample

    model = build_model("llava", num_layers=L)
    prepared = _prepared(model, "llava", 2)
    sp = _space(space_name, prepared, **kw)
    t = build_table(model, prepared, sp, ranker, _key(sp, str(ranker)), progress=False)
    fast, naive = layer_evals_per_sample(sp, ranker)
    assert (t.layer_evals, t.naive_layer_evals) == (2 * fast, 2 * naive) and fast < naive


@pytest.mark.parametrize("space_name", ["dop", "multigroup"])
def test_value_batch_changes_the_layer_calls_not_the_table(space_name):
    """Entries of one start layer share a batched forward (docs/design.md, "Table cost"): the
    table equals one entry per forward (float64, 1e-12) while the layer calls are what
    layer_evals_per_sample prices, fewer with larger batches."""
    from dop.search.table import layer_evals_per_sample

    model = build_model("qwen2_5_vl", num_layers=L)
    model, prepared = _float64(model, _prepared(model, "qwen2_5_vl", 2))
    kw = {"nv_stride": 3} if space_name == "dop" else {"groups": [0.5, 1.0]}
    sp = _space(space_name, prepared, **kw)
    tables = {vb: build_table(model, prepared, sp, "random:seed=2", _key(sp), progress=False, value_batch=vb)
              for vb in (1, 3, 64)}
    for vb, t in tables.items():
        worst = max(abs(a - b) for n in t.entries for v in t.entries[n]
                    for a, b in zip(t.entries[n][v], tables[1].entries[n][v]))
        assert worst < 1e-12, f"value_batch={vb}: entries differ by {worst:.3g}"
        assert (t.layer_evals, t.naive_layer_evals) == tuple(2 * x for x in layer_evals_per_sample(sp, "random", vb))
        assert t.token_layers < t.naive_token_layers
    assert tables[64].layer_evals < tables[3].layer_evals < tables[1].layer_evals
    assert tables[64].naive_layer_evals == tables[1].naive_layer_evals
    # the batched replay does the same work: the MLP token rows do not depend on the batching
    assert tables[64].token_layers == tables[3].token_layers == tables[1].token_layers
    with pytest.raises(ValueError, match="value_batch"):
        build_table(model, prepared, sp, "random", _key(sp), progress=False, value_batch=0)


@pytest.mark.parametrize("num_layers,n_visual", [(8, 144), (32, 576), (28, 1024)])
def test_dop_table_spends_at_most_half_the_naive_layer_calls(num_layers, n_visual):
    """Issue 17: the `dop` space's table at the demo's and the 7B models' shapes."""
    from dop.search.table import layer_evals_per_sample

    for ranker in ("vispruner", "fastv"):
        sp = make_space("dop", num_layers, n_visual, min_depth=3 if ranker == "fastv" else 0)
        fast, naive = layer_evals_per_sample(sp, ranker)
        assert fast <= 0.5 * naive, f"{ranker}: {fast} of {naive}"


def test_demo_table_equals_the_naive_one_in_float32():
    """The batched table on the real demo model (float32, VisPruner, whose ranks depend on each
    n_v's n_keep) equals the naive table to 2e-5: four times the largest difference between
    two naive tables of 25 samples that differ only in batch shape (5.07e-06,
    docs/benchmarks.md "Table cost")."""
    from dop.evaluate.datasets import load_dataset
    from dop.evaluate.loading import load_model
    from dop.search.divergence import prepare_samples

    model, processor = load_model("demo")
    prepared = prepare_samples(model, processor, load_dataset("shapes:val", limit=2))
    sp = make_space("dop", 8, max(prepared[0].visual_counts), nv_stride=16, stride=2)
    key = _key(sp, "vispruner")
    fast = build_table(model, prepared, sp, "vispruner", key, progress=False)
    slow = build_table(model, prepared, sp, "vispruner", key, progress=False, naive=True)
    pairs = [(a, b) for n in fast.entries for v in fast.entries[n] for a, b in zip(fast.entries[n][v], slow.entries[n][v])]
    worst = max(abs(a - b) for a, b in pairs)
    assert worst < 2e-5 and max(b for _, b in pairs) > 1.0, f"batched and naive demo tables differ by {worst:.3g}"
    assert fast.layer_evals <= 0.5 * fast.naive_layer_evals


def test_public_names_of_dop_search():
    """dop.search exports verify's classes, the random-policy draws and the compared methods
    (``search_method`` is :func:`dop.search.methods.search`; ``search`` stays dop's)."""
    import importlib

    import dop.search as S
    from dop.search import api, methods, spaces

    verify = importlib.import_module("dop.search.verify")  # the name dop.search.verify is the function
    assert all(hasattr(S, name) for name in S.__all__)
    assert S.search is api.search and S.search_method is methods.search and S.MethodResult is methods.MethodResult
    assert (S.Candidates, S.SampleSet, S.measure) == (verify.Candidates, verify.SampleSet, verify.measure)
    assert S.draw_feasible is spaces.draw_feasible and S.DEFAULT_DRAW == "ordered" and S.DEFAULT_DRAW in S.DRAWS
