"""Held-out verification (issue 17, item 2): `dop search --verify K` measures the same
candidate policies on the searched samples and on samples the search did not use
(``--verify-data``, default the samples of ``--data`` after the searched ones), in the API,
the CLI summary and its JSON, and under torchrun."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from dop.cli import main
from dop.evaluate.datasets import load_dataset
from dop.evaluate.heldout import heldout_samples
from dop.runtime.replay import last_logits
from dop.search import PreparedSample, search, true_divergence
from tiny_models import build_inputs, build_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _prepared(model, seeds):
    out = []
    for seed in seeds:
        inputs, counts = build_inputs(model, "llava", num_images=1, seed=seed)
        out.append(PreparedSample(inputs, counts, int(inputs["input_ids"].shape[1]) - sum(counts)))
    return out


def _true(model, prepared, policy, ranker):
    with torch.inference_mode():
        refs = [last_logits(model, s.inputs) for s in prepared]
    return true_divergence(model, prepared, refs, policy, ranker)[0]


# ---------------------------------------------------------------------- which samples
def test_default_heldout_samples_follow_the_searched_ones():
    searched = load_dataset("shapes:val", limit=3)
    rows, where = heldout_samples("shapes:val", 3, 4)
    assert [r.question for r in rows] == [r.question for r in load_dataset("shapes:val", limit=7)[3:]]
    assert {r.question for r in rows}.isdisjoint(r.question for r in searched) and "samples 4-7" in where
    rows, where = heldout_samples("shapes:val", 3, 2, verify_data="shapes:val:9")
    assert [r.question for r in rows] == [r.question for r in load_dataset("shapes:val:9", limit=2)]
    with pytest.raises(ValueError, match="positive integer"):
        heldout_samples("shapes:val", 3, 0)


def test_a_split_with_nothing_left_gives_no_heldout_samples(tmp_path):
    from fixtures_eval import write_jsonl_dataset

    data = write_jsonl_dataset(tmp_path, [{"question": "what color ?", "answers": ["red"]}] * 3)
    assert heldout_samples(str(data), 2, 5)[0] and len(heldout_samples(str(data), 2, 5)[0]) == 1
    rows, where = heldout_samples(str(data), 3, 5)
    assert rows == [] and where.startswith("none")


# ---------------------------------------------------------------------- the search API
@pytest.fixture(scope="module")
def verified():
    model = build_model("llava", num_layers=4)
    searched, held = _prepared(model, range(3)), _prepared(model, range(10, 14))
    res = search(model, None, searched, budget=0.6, space="dop", ranker="spatial", progress=False,
                 verify_k=4, verify_samples=held, seed=1)
    return model, searched, held, res


def test_heldout_figures_are_the_same_policies_on_the_other_samples(verified):
    model, searched, held, res = verified
    r = res.results[0]
    v, h = r.verification, r.heldout
    assert (v.num_samples, h.num_samples, res.heldout_samples) == (3, 4, 4)
    assert [x["assign"] for x in v.random] == [x["assign"] for x in h.random] and len(h.random) == 4
    assert [x["proxy"] for x in v.random] == [x["proxy"] for x in h.random]  # the proxy is the table's
    chosen = r.solution.policy
    assert v.chosen_true == pytest.approx(_true(model, searched, chosen, "spatial"), rel=1e-6)
    assert h.chosen_true == pytest.approx(_true(model, held, chosen, "spatial"), rel=1e-6)
    assert h.chosen_true != pytest.approx(v.chosen_true, rel=1e-3)  # other samples, other figures
    space = res.space
    for row in h.random:
        assert row["true"] == pytest.approx(_true(model, held, space.policy(row["assign"]), "spatial"), rel=1e-6)
    assert r.policy.meta["heldout_true_divergence"] == h.chosen_true and r.policy.meta["heldout_samples"] == 4
    d = r.to_dict()
    assert d["verification"]["samples"] == 3 and d["verification_heldout"]["chosen_true"] == h.chosen_true
    assert res.to_dict()["heldout_samples"] == 4


def test_heldout_samples_need_verify_and_overlap_is_said(verified):
    model, searched, held, _ = verified
    with pytest.raises(ValueError, match="verify_samples applies only together with verify_k"):
        search(model, None, searched, budget=0.6, ranker="spatial", progress=False, verify_samples=held)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = search(model, None, searched, budget=0.6, ranker="spatial", progress=False, verify_k=1,
                     verify_samples=[searched[0], held[0]])
    assert any("1 of the 2 held-out samples are also search samples" in str(w.message) for w in caught)
    assert res.results[0].heldout.num_samples == 2


def test_verify_draws_its_random_policies_as_asked():
    """``verify_draw``: the random policies of the verification are :func:`draw_feasible`'s
    of that draw (default "ordered"), the same on both sample sets, and the draw is recorded;
    an unknown draw fails before any model work."""
    from dop.search import CostModel
    from dop.search.divergence import reference_shape
    from dop.search.spaces import draw_feasible

    model = build_model("llava", num_layers=4)
    searched, held = _prepared(model, range(2)), _prepared(model, range(10, 12))
    kw = dict(budget=0.5, space="multigroup", groups=[0.5, 1.0], ranker="spatial", progress=False, verify_k=6,
              verify_samples=held, seed=2)
    first = search(model, None, searched, **kw)
    got = {"ordered": first, "uniform": search(model, None, searched, table=first.table, verify_draw="uniform", **kw)}
    cost = CostModel(model, *reference_shape(searched), "dop")
    for draw, res in got.items():
        r = res.results[0]
        want = draw_feasible(res.space, cost.policy_cost, r.solution.limit, 6, 2, draw)
        assert [x["assign"] for x in r.verification.random] == want == [x["assign"] for x in r.heldout.random]
        assert r.verification.draw == r.heldout.draw == draw == r.to_dict()["verification_heldout"]["draw"]
    assert [x["assign"] for x in got["ordered"].results[0].verification.random] != \
        [x["assign"] for x in got["uniform"].results[0].verification.random]
    with pytest.raises(ValueError, match="unknown draw 'sorted'"):
        search(model, None, [], budget=0.5, verify_k=2, verify_draw="sorted")


# ---------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from fixtures_eval import WORDS, build_tiny_llava, write_jsonl_dataset

    root = tmp_path_factory.mktemp("heldout")
    model = build_tiny_llava(root / "tiny")
    rows = [{"question": "what color is the circle ?", "answers": WORDS[i % 2::2], "colour": (35 * i, 90, 200 - 25 * i)}
            for i in range(6)]
    return root, str(model), str(write_jsonl_dataset(root / "data", rows))


def _search(model, data, out, *extra):
    return ["search", "--model", model, "--data", data, "--samples", "3", "--budget", "0.7", "--ranker", "spatial",
            "--no-progress", "--threads", "1", "-o", str(out / "p.json"), "--json", str(out / "s.json"), *extra]


def test_cli_reports_in_sample_and_heldout_side_by_side(saved, capsys):
    root, model, data = saved
    out = root / "cli"
    out.mkdir()
    assert main(_search(model, data, out, "--verify", "3")) == 0
    text = capsys.readouterr().out
    assert "in-sample (3)" in text and "held-out (3)" in text and "held-out verification on 3 samples" in text
    doc = json.loads((out / "s.json").read_text())
    assert doc["verify_data"].endswith("samples 4-6, after the 3 searched") and doc["heldout_samples"] == 3
    r = doc["results"][0]
    assert r["verification"]["samples"] == 3 and r["verification_heldout"]["samples"] == 3
    assert r["policy"]["meta"]["heldout_true_divergence"] == r["verification_heldout"]["chosen_true"]
    assert r["verification"]["chosen_true"] != r["verification_heldout"]["chosen_true"]  # the columns can be told apart
    line = next(x for x in text.splitlines() if "true divergence, chosen policy" in x)
    assert line.split()[-2:] == [format(r["verification"]["chosen_true"], ".5g"),
                                 format(r["verification_heldout"]["chosen_true"], ".5g")]


def test_cli_without_heldout_samples_says_so(saved, capsys):
    root, model, data = saved
    out = root / "none"
    out.mkdir()
    args = _search(model, data, out, "--verify", "2")
    args[args.index("--samples") + 1] = "6"
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "no held-out samples" in captured.err and "held-out (" not in captured.out
    assert json.loads((out / "s.json").read_text())["results"][0]["verification_heldout"] is None


@pytest.mark.parametrize("extra,match", [
    (["--verify-data", "shapes:val"], "apply only together with --verify"),
    (["--verify", "2", "--verify-samples", "0"], "--verify-samples must be a positive integer"),
    (["--verify", "2", "--verify-data", "nosuch:val"], "unknown data set"),
])
def test_cli_heldout_bad_inputs(saved, capsys, extra, match):
    root, model, data = saved
    assert main(_search(model, data, root, *extra)) == 2
    assert match in capsys.readouterr().err
