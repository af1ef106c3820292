"""Certified choice and robust aggregation (issue 22): the K best policies by proxy measured
by their true joint divergence, ``candidates=1`` exactly the proxy's choice, the median and
trimmed mean, outliers named, per-sample divergences kept."""

from __future__ import annotations

import json

import pytest
import torch

from dop.cli import main
from dop.policy import Policy
from dop.search import CostModel, DivergenceTable, Solver, search, true_divergence
from dop.search.kbest import k_best
from dop.search.robust import aggregate, outliers
from dop.runtime.replay import last_logits
from test_search import _float64, _prepared
from tiny_models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny():
    model = build_model("llava", num_layers=4)
    return _float64(model, _prepared(model, "llava", 3))  # batched replays equal full forwards to ~1e-15


def _true(model, prepared, policy, ranker):
    with torch.inference_mode():
        refs = [last_logits(model, s.inputs) for s in prepared]
    return true_divergence(model, prepared, refs, policy, ranker)


@pytest.mark.parametrize("space", ["dop", "multigroup"])
def test_certified_choice_measures_the_k_best(tiny, space):
    model, prepared = tiny
    kw = dict(budgets=[0.7, 0.85], space=space, ranker="random:seed=1", progress=False, nv_stride=4) \
        if space == "dop" else dict(budgets=[0.7, 0.85], space=space, ranker="random:seed=1", progress=False,
                                    groups=[0.5, 1.0])
    plain = search(model, None, prepared, candidates=1, **kw)
    got = search(model, None, prepared, candidates=4, table=plain.table, **kw)
    proxy = plain.table.proxy(plain.space)
    for p, r in zip(plain.results, got.results):
        # candidates=1: exactly the proxy's choice, nothing measured
        cost = CostModel(model, plain.shape["visual_tokens"], plain.shape["text_tokens"], r.solution.convention)
        solver = Solver(plain.space, proxy, cost)
        assert p.certified is None and p.solution.assign == solver.solve(r.solution.limit).assign
        c = r.certified
        best = k_best(solver, r.solution.limit, 4)
        assert [x["params"] for x in c.candidates] == [s.assign for s in best]
        assert c.candidates[0]["params"] == p.solution.assign  # the proxy's choice is candidate 1
        for row in c.candidates:  # the true joint divergence of each, mean over the search samples
            mean, _ = _true(model, prepared, Policy.from_dict(row["policy"]), "random:seed=1")
            assert row["true"] == pytest.approx(mean, rel=1e-9, abs=1e-12)
        trues = [x["true"] for x in c.candidates]
        assert c.chosen == trues.index(min(trues))
        assert r.solution.assign == c.candidates[c.chosen]["params"]
        assert r.policy.meta["certified"]["candidates"] == len(c.candidates)
        assert r.policy.meta["params"] == c.candidates[c.chosen]["params"]
        assert r.flops["dop"]["after"] == c.candidates[c.chosen]["cost"]
        assert len(c.chosen_per_sample) == len(prepared)
    assert plain.certify_evaluations == 0 and 0 < got.certify_evaluations <= 8  # shared across budgets
    # per sample: the reference forward, the cached unpruned run, one batched replay per 8 policies
    # (every budget's candidates measured together)
    assert got.certify_layer_evals == (2 + -(-got.certify_evaluations // 8)) * 4 * len(prepared)


def test_aggregates_and_outliers():
    xs = [0.1, 0.2, 0.3, 0.4, 100.0, 0.25, 0.15, 0.35, 0.05, 0.3]
    assert aggregate(xs) == pytest.approx(sum(xs) / 10)
    assert aggregate(xs, "median") == pytest.approx(0.275)
    assert aggregate([3.0, 1.0, 2.0], "median") == 2.0
    # trimmed: 10% of 10 = 1 sample dropped at each end (0.05 and 100)
    assert aggregate(xs, "trimmed") == pytest.approx((sum(xs) - 0.05 - 100.0) / 8)
    assert aggregate([1.0, 2.0, 30.0], "trimmed") == pytest.approx(11.0)  # 10% of 3 rounds down to 0
    with pytest.raises(ValueError, match="unknown aggregate 'max'"):
        aggregate(xs, "max")
    found = outliers(xs, [f"s{i}" for i in range(10)])
    assert [o["sample"] for o in found] == ["s4"] and found[0]["ratio"] == pytest.approx(100 / 0.275)
    assert outliers([0.0, 0.0, 5.0]) == []  # a zero median names nobody


def test_median_objective_and_sample_ids(tiny, tmp_path):
    model, prepared = tiny
    for i, s in enumerate(prepared):
        s.where = f"tiny #{i}"
    path = str(tmp_path / "t.json")
    res = search(model, None, prepared, budget=0.8, ranker="random:seed=1", progress=False, nv_stride=4,
                 candidates=1, aggregate="median", table=path)
    tab = DivergenceTable.load(path)
    assert tab.sample_ids == ["tiny #0", "tiny #1", "tiny #2"]
    proxy = tab.proxy(res.space, "median")
    for name, vals in tab.entries.items():
        for v, per in vals.items():
            assert proxy[name][v] == pytest.approx(sorted(per)[1])  # the median of 3
    assert res.results[0].solution.predicted == pytest.approx(
        sum(proxy[k][v] for k, v in res.results[0].solution.assign.items()))
    # a table file of before (no sample_ids) still loads
    doc = json.loads(open(path).read())
    doc.pop("sample_ids")
    assert DivergenceTable.from_dict(doc).sample_ids is None


def test_cli_candidates_summary(tmp_path, capsys):
    from fixtures_eval import build_tiny_llava, write_jsonl_dataset

    model = build_tiny_llava(tmp_path / "tiny")
    rows = [{"question": "what color is the circle ?", "answers": ["red"], "colour": (30 * i, 90, 200 - 20 * i)}
            for i in range(6)]
    data = write_jsonl_dataset(tmp_path / "data", rows)
    args = ["search", "--model", str(model), "--data", str(data), "--samples", "3", "--budget", "0.8",
            "--ranker", "random", "--no-progress", "--threads", "1", "-o", str(tmp_path / "p.json"),
            "--json", str(tmp_path / "s.json")]
    assert main(args + ["--candidates", "3", "--verify", "2", "--aggregate", "trimmed"]) == 0
    text = capsys.readouterr().out
    for needle in ("certified choice among the 3 best policies by proxy", "chosen: #", "held-out",
                   "candidate policies measured on every search sample", "trimmed mean (10% of the samples"):
        assert needle in text, needle
    doc = json.loads((tmp_path / "s.json").read_text())
    c = doc["results"][0]["certified"]
    assert len(c["candidates"]) == 3 and len(c["heldout"]) == 3 and c["aggregate"] == "trimmed"
    assert doc["results"][0]["verification"]["aggregate"] == "trimmed"
    assert len(doc["results"][0]["verification"]["chosen_per_sample"]) == 3
    assert main(args + ["--candidates", "0"]) == 2
    assert "--candidates must be a positive integer" in capsys.readouterr().err


def test_report_shows_the_candidates_and_outliers():
    from dop.report.certified import certified_section
    from dop.search.certify import Certified

    rows = [{"params": {"n_v": 9 - i}, "proxy": 0.1 * i, "true": t, "cost": 1, "policy": {},
             "per_sample": [t, t, 30 * t] if i == 1 else [t] * 3} for i, t in enumerate([0.3, 0.01, 0.2])]
    c = Certified(rows, 1, "mean", 3, ["a", "b", "c"], [0.4, 0.02, 0.1], 3)
    assert c.outliers == [{"sample": "c", "divergence": pytest.approx(0.3), "ratio": pytest.approx(30.0)}]
    assert c.spearman_heldout == pytest.approx(1.0)
    text = "\n".join(certified_section({"tables": {"dop": {"certified": {"tokens:16": c.to_dict()}}}}))
    assert "| tokens:16 | 1 | n_v=9 | 0 | 0.3 | 0.4 |" in text
    assert "|  | **2** | **n_v=8** | **0.1** | **0.01** | **0.02** |" in text  # the chosen one, bold
    assert "outliers among the search samples" in text and "c (0.3, 30x)" in text
    assert "Spearman over the candidates, held-out truth vs the search samples' ranking 1.000" in text
