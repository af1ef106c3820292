"""The comparison methods (issue 17, docs/methods.md): VTW, ShortV and GSOP on tiny models,
each checked against a brute-force recomputation of its rule, and a short demo run."""

from __future__ import annotations

import json

import pytest
import torch

from dop.policy import Policy
from dop.search import BudgetError, CostModel, PreparedSample, true_divergence
from dop.search.methods import METHODS, gsop, search, shortv, vtw
from dop.runtime.replay import last_logits
from tiny_models import build_inputs, build_model

L = 4
FAMILY = "llava"

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny():
    model = build_model(FAMILY, num_layers=L)
    prepared = []
    for seed in range(3):
        inputs, counts = build_inputs(model, FAMILY, num_images=1, seed=seed)
        prepared.append(PreparedSample(inputs, counts, int(inputs["input_ids"].shape[1]) - sum(counts)))
    with torch.inference_mode():
        refs = [last_logits(model, s.inputs) for s in prepared]
    return model, prepared, refs


def _costs(model, prepared, convention):
    return CostModel(model, prepared[0].visual_counts, prepared[0].text_tokens, convention)


def _truth(tiny, policy, ranker="identity"):
    model, prepared, refs = tiny
    return true_divergence(model, prepared, refs, policy, ranker)[0]


def _meets(res, tiny):
    model, prepared, _ = tiny
    for r in res.results:
        assert r.met, r.note
        assert _costs(model, prepared, r.convention).policy_cost(r.policy) <= r.limit


# ---------------------------------------------------------------------- VTW
def test_vtw_rule_against_brute_force(tiny):
    model, prepared, _ = tiny
    budgets = ["tokens:8", "tokens:12", 0.9]
    res = vtw.search(model, None, prepared, budgets=budgets, progress=False)
    _meets(res, tiny)
    for r, spec in zip(res.results, budgets):
        cost = _costs(model, prepared, r.convention)
        fitting = [k for k in range(L + 1) if cost.policy_cost(vtw.withdrawal_policy(L, k)) <= r.limit]
        truth = {k: _truth(tiny, vtw.withdrawal_policy(L, k)) if k < L else 0.0 for k in fitting}
        best = min(fitting, key=lambda k: (truth[k], k))
        assert r.policy.meta["params"]["K"] == best, spec
        assert r.divergence == pytest.approx(truth[best], rel=1e-6, abs=1e-9)
        p = r.policy
        assert p.groups == (1.0,) and not p.skip  # a withdrawal: every op of every visual token, from K on
        assert set(p.depth) <= {"attn", "mlp"} and len({d for ds in p.depth.values() for d in ds}) <= 1


def test_vtw_choose_rule():
    kl = {0: 0.5, 1: 0.1, 2: 0.1, 3: 0.05, 4: 0.0}
    assert vtw.choose(kl, 2) == 1  # least KL among K <= 2, the smaller K on a tie
    assert vtw.choose(kl, 4) == 4
    assert vtw.choose(kl, 4, threshold=0.2) == 1  # the paper's rule: the first K under the threshold
    assert vtw.choose(kl, 0, threshold=0.2) == 0  # none under it: the least KL


def test_vtw_deterministic_and_unpruned_note(tiny):
    model, prepared, _ = tiny
    a = vtw.search(model, None, prepared, budget=1.0, progress=False)
    b = vtw.search(model, None, prepared, budget=1.0, progress=False)
    assert a.policy.is_unpruned() and "nothing is pruned" in a.results[0].note
    assert a.to_dict()["results"][0]["policy"] == b.to_dict()["results"][0]["policy"]
    assert [t["divergence"] for t in a.trace] == [t["divergence"] for t in b.trace]


# ---------------------------------------------------------------------- ShortV
def test_shortv_rule_against_brute_force(tiny):
    model, prepared, _ = tiny
    budgets = ["tokens:10", 0.8]
    res = shortv.search(model, None, prepared, budgets=budgets, progress=False)
    _meets(res, tiny)
    lc = {l: _truth(tiny, shortv.frozen_policy(L, [l])) for l in range(L)}
    assert [t["contribution"] for t in res.trace] == pytest.approx([lc[l] for l in range(L)], rel=1e-6, abs=1e-9)
    order = sorted(lc, key=lambda l: (lc[l], l))
    for r in res.results:
        p = r.policy
        assert "attn_kv" not in p.skip and "attn" not in p.skip and "attn_kv" not in p.depth  # keys/values kept
        frozen = r.policy.meta["params"]["frozen_layers"]
        k = len(frozen)
        assert sorted(order[:k]) == frozen
        assert all(not p.processed("attn_q", 0, l) and not p.processed("mlp", 0, l) for l in frozen)
        assert all(p.processed("attn_kv", 0, l) for l in range(L))
        cost = _costs(model, prepared, r.convention)
        assert k == 0 or cost.policy_cost(shortv.frozen_policy(L, order[:k - 1])) > r.limit  # as few as needed
        assert r.divergence == pytest.approx(_truth(tiny, p), rel=1e-6, abs=1e-9)


def test_shortv_budget_it_cannot_meet_is_noted(tiny):
    model, prepared, _ = tiny
    res = shortv.search(model, None, prepared, budget="tokens:1", progress=False)
    r = res.results[0]
    assert not r.met and "cannot meet" in r.note
    assert len(r.policy.meta["params"]["frozen_layers"]) == L


# ---------------------------------------------------------------------- GSOP
GSOP_KW = dict(groups=(0.5, 1.0), kinds=("attn", "mlp"), block=2, ranker="spatial", progress=False)


def test_gsop_each_step_is_the_argmin(tiny):
    model, prepared, _ = tiny
    res = gsop.search(model, None, prepared, budgets=["tokens:4", "tokens:8"], **GSOP_KW)
    _meets(res, tiny)
    space = gsop.OpSpace(L, GSOP_KW["groups"], GSOP_KW["kinds"], GSOP_KW["block"])
    cost = _costs(model, prepared, "paper")
    removed, cur_loss = [], 0.0
    cur_cost = cost.policy_cost(space.policy(removed))
    assert res.trace, "the greedy path is empty"
    for step in res.trace:
        keys = {}
        for i, op in enumerate(space.ops):
            if op in removed:
                continue
            pol = space.policy(removed + [op])
            saving = cur_cost - cost.policy_cost(pol)
            loss = _truth(tiny, pol, "spatial")
            keys[op] = ((loss - cur_loss) / saving, -saving, i, loss)
        chosen = min(keys, key=lambda o: keys[o][:3])
        assert step["op"] == chosen.to_dict(space.block, L)
        assert step["criterion"] == pytest.approx(keys[chosen][0], rel=1e-5, abs=1e-9)
        assert step["candidates"] == len(keys)
        removed.append(chosen)
        cur_loss, new_cost = keys[chosen][3], cost.policy_cost(space.policy(removed))
        assert new_cost < cur_cost and step["cost"] == new_cost  # monotone in cost
        cur_cost = new_cost
    # each budget's policy: the first of the path that meets it
    for r in res.results:
        j = r.policy.meta["params"]["steps"]
        assert cost.policy_cost(space.policy(removed[:j])) <= r.limit
        assert j == 0 or cost.policy_cost(space.policy(removed[:j - 1])) > r.limit
        assert r.divergence == pytest.approx(_truth(tiny, r.policy, "spatial"), rel=1e-5, abs=1e-9)


def test_gsop_deterministic(tiny):
    model, prepared, _ = tiny
    a = gsop.search(model, None, prepared, budget="tokens:8", **GSOP_KW)
    b = gsop.search(model, None, prepared, budget="tokens:8", **GSOP_KW)
    assert a.trace == b.trace and a.policy == b.policy


def test_gsop_default_block_is_a_quarter_of_the_depth(tiny):
    model, prepared, _ = tiny
    kw = {**GSOP_KW, "groups": (1.0,), "kinds": ("mlp",)}
    del kw["block"]
    res = gsop.search(model, None, prepared, budget="tokens:12", **kw)
    assert res.trace and all(len(s["op"]["layers"]) == L // 4 for s in res.trace)
    assert res.trace[0]["candidates"] == 4


def test_gsop_budget_below_its_reach_is_noted(tiny):
    model, prepared, _ = tiny
    kw = {**GSOP_KW, "groups": (1.0,), "block": 4}
    res = gsop.search(model, None, prepared, budget=0.05, **kw)  # the text alone costs more
    r = res.results[0]
    assert not r.met and "cannot meet 0.05" in r.note
    assert len(res.trace) == 2 and r.policy.meta["params"]["steps"] == 2  # every operation removed


@pytest.mark.parametrize("kw, msg", [
    (dict(metric="loss"), "metric must be one of"),
    (dict(block=0), "block must be an integer"),
    (dict(kinds=("attn", "attn_q")), "may not be combined"),
    (dict(kinds=("ffn",)), "kinds must be"),
    (dict(groups=(0.5, 0.9)), "groups:"),
    (dict(metric="accuracy"), "needs the samples with their answers"),
])
def test_gsop_bad_input(tiny, kw, msg):
    model, prepared, _ = tiny
    with pytest.raises(ValueError, match=msg):
        gsop.search(model, None, prepared, budget="tokens:8", progress=False, **kw)


def test_dispatch_and_bad_budget(tiny):
    model, prepared, _ = tiny
    assert set(METHODS) == {"gsop", "shortv", "vtw"}
    with pytest.raises(ValueError, match="unknown method 'x'"):
        search("x", model, None, prepared, budget=0.5)
    with pytest.raises(BudgetError):
        search("vtw", model, None, prepared, budget=1.5)
    with pytest.raises(ValueError, match="give a budget"):
        search("shortv", model, None, prepared)


def test_withdrawal_and_frozen_policies():
    assert vtw.withdrawal_policy(8, 8) == Policy.unpruned(8)
    assert dict(vtw.withdrawal_policy(8, 3).depth) == {"attn": (3,), "mlp": (3,)}
    p = shortv.frozen_policy(8, [5, 1])
    assert [l for l in range(8) if not p.processed("mlp", 0, l)] == [1, 5]
    assert shortv.frozen_policy(8, []) == Policy.unpruned(8)


# ---------------------------------------------------------------------- the demo, briefly
@pytest.fixture(scope="module")
def demo():
    from dop.evaluate.datasets import load_dataset
    from dop.evaluate.loading import load_model

    model, processor = load_model("demo")
    return model, processor, load_dataset("shapes:val", limit=3)


@pytest.mark.parametrize("method, kw", [
    ("vtw", {}),
    ("shortv", {}),
    ("gsop", dict(groups=(0.5, 1.0), block=4, ranker="vispruner", batch_size=2)),
])
def test_demo_short_run(demo, method, kw):
    model, processor, samples = demo
    res = search(method, model, processor, samples, budgets=["tokens:48", "tokens:96"], progress=False, **kw)
    assert [r.budget.spec for r in res.results] == ["tokens:48", "tokens:96"]
    for r in res.results:
        assert r.met and r.flops["paper"]["fraction"] <= (48 if r.budget.spec == "tokens:48" else 96) / 144 + 1e-3
        assert r.policy.meta["method"] == method and r.policy.meta["budget"] == r.budget.spec
        assert r.divergence >= 0 and r.policy.meta["true_divergence"] == r.divergence
    assert res.evaluations > 0 and res.layer_evals == res.naive_layer_evals > 0
    assert res.shape["visual_tokens"] == [144]
    back = json.loads(json.dumps(res.to_dict()))  # what a command writes
    assert back["method"] == method and len(back["results"]) == 2 and back["trace"]
    assert Policy.from_dict(back["results"][0]["policy"]) == res.policy


def test_demo_gsop_accuracy_metric(demo):
    model, processor, samples = demo
    kw = dict(groups=(1.0,), block=4, kinds=("attn", "mlp"), ranker="identity", progress=False, max_new_tokens=4)
    res = gsop.search(model, processor, samples, budget="tokens:48", metric="accuracy", **kw)
    assert res.results[0].met and res.trace
    assert all(0.0 <= s["loss"] <= 1.0 for s in res.trace)  # one minus the mean accuracy
    assert res.policy.meta["params"]["metric"] == "accuracy"
    from dop.evaluate import evaluate

    again = evaluate(model, processor, samples, res.policy, "identity", max_new_tokens=4, progress=False,
                     run_baseline=False, time_prefill=False)
    assert res.policy.meta["params"]["loss"] == pytest.approx(1.0 - again.average)  # the loss is 1 - accuracy


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from fixtures_eval import build_tiny_llava

    return str(build_tiny_llava(tmp_path_factory.mktemp("tiny-ckpt") / "ckpt"))


def test_dop_search_space_runs_the_method(tiny_ckpt, tmp_path, capsys):
    """`dop search --space vtw|shortv|gsop` writes the method's policy per budget (that of
    dop.search.methods on the same samples) and, with --verify, its held-out divergence."""
    from dop.cli import main
    from dop.evaluate import load_dataset, load_model, prompt_builder_for

    args = ["search", "--model", tiny_ckpt, "--data", "shapes:val", "--samples", "2", "--budgets", "0.5,0.8",
            "--ranker", "spatial", "--no-progress", "--verify", "1", "--verify-samples", "2"]
    model, proc = load_model(tiny_ckpt)
    for name in ("vtw", "gsop"):
        out, js = tmp_path / f"{name}.json", tmp_path / f"{name}-summary.json"
        assert main(args + ["--space", name, "-o", str(out), "--json", str(js)]) == 0
        printed = capsys.readouterr().out
        assert f"method {name}" in printed and "held-out" in printed
        direct = search(name, model, proc, load_dataset("shapes:val", limit=2), budgets=["0.5", "0.8"],
                        ranker="spatial", build_prompt=prompt_builder_for(tiny_ckpt), progress=False)
        summary = json.loads(js.read_text())
        assert len(summary["heldout_divergence"]) == 2 and None not in summary["heldout_divergence"]
        for r, spec in zip(direct.results, ("0.5", "0.8")):
            got = Policy.from_json(tmp_path / f"{name}.{spec}.json")
            assert got.replace(meta=None) == r.policy.replace(meta=None), (name, spec)


@pytest.mark.parametrize("extra,msg", [
    (["--space", "gsop", "--table", "t.json"], "--table: the divergence table's options apply"),
    (["--space", "vtw", "--metric", "accuracy"], "--metric applies to --space gsop only"),
    (["--space", "dop", "--metric", "accuracy"], "--metric applies to --space gsop only"),
])
def test_dop_search_method_bad_options(tiny_ckpt, tmp_path, capsys, monkeypatch, extra, msg):
    from dop.cli import main

    monkeypatch.chdir(tmp_path)
    rc = main(["search", "--model", tiny_ckpt, "--data", "shapes:val", "--samples", "2", "--budget", "0.5",
               "-o", "p.json", "--no-progress", *extra])
    assert rc == 2 and msg in capsys.readouterr().err
