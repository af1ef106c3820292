"""`dop run` end to end on a tiny saved checkpoint, and resume."""

from __future__ import annotations

import json

import pytest

from dop.cli import main
from fixtures_eval import build_tiny_llava


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(build_tiny_llava(tmp_path_factory.mktemp("tiny") / "ckpt"))


def _args(model, out):
    return ["run", "--model", model, "--samples", "2", "--test-samples", "3", "--budgets", "tokens:1/3,0.9",
            "--space", "dop", "--baselines", "spatial,random", "--methods", "none", "--ranker", "spatial",
            "--out", str(out), "--no-progress"]


def _fraction(model, policy: dict, convention: str, res: dict) -> float:
    """The decoder FLOPs fraction of ``policy`` in ``convention`` at the run's reference shape
    (its visual tokens; the text tokens the baselines were fitted at)."""
    from dop import Policy, count_flops

    text = {m["policy"]["meta"].get("flops_text_tokens") for b in res["budgets"] for m in b["methods"]} - {None}
    assert len(text) == 1, text
    rep = count_flops(model, Policy.from_dict(policy), num_visual_tokens=res["num_visual_tokens"],
                      num_text_tokens=text.pop(), convention=convention)
    return rep.decoder / rep.decoder_unpruned


def test_run_end_to_end_and_resume(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny, out)) == 0
    printed = capsys.readouterr().out
    assert "DOP (dop)" in printed and "report:" in printed
    for name in ("report.md", "pareto.png", "policy_map.png", "results.json", "divergence_dop.png"):
        assert (out / name).is_file(), name
    res = json.loads((out / "results.json").read_text())
    assert [b["spec"] for b in res["budgets"]] == ["tokens:1/3", "0.9"]
    for b in res["budgets"]:
        methods = [m["method"] for m in b["methods"]]
        assert methods == ["DOP (dop)", "spatial", "random"]
        for m in b["methods"]:
            assert (out / m["policy_file"]).is_file()
            # every method stays within the budget it was given, counted in the budget's own
            # convention (paper for tokens:, dop for fractions) at the run's reference prompt
            assert _fraction(tiny, m["policy"], b["convention"], res) <= b["fraction"] + 1e-9, (b["spec"], m["method"])
    report = (out / "report.md").read_text()
    assert "## Budget: tokens:1/3" in report and "Rel. Avg." in report
    assert res["reused"] == []

    # run again with the same --out: every stage is reused, the figures are identical
    assert main(_args(tiny, out)) == 0
    res2 = json.loads((out / "results.json").read_text())
    assert set(res2["reused"]) >= {"search-dop", "eval-unpruned"}
    assert res2["budgets"] == res["budgets"]


def test_run_bad_budget_is_a_clear_error(tiny, tmp_path, capsys):
    args = _args(tiny, tmp_path / "bad")
    args[args.index("tokens:1/3,0.9")] = "1.5"
    assert main(args) == 2
    assert "budget" in capsys.readouterr().err


def test_run_reports_heldout_divergences(tiny, tmp_path):
    """Issue 17, item 2: each search is verified on the samples after the searched ones; the
    in-sample and held-out figures reach results.json and report.md."""
    out = tmp_path / "v"
    args = _args(tiny, out) + ["--verify", "2", "--verify-samples", "3"]
    args[args.index("tokens:1/3,0.9")] = "0.7"
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    t = res["tables"]["dop"]
    assert t["verify_data"] == "shapes:val samples 3-5, after the 2 searched"
    v = t["verification"]["0.7"]
    assert v["in_sample"]["samples"] == 2 and v["held_out"]["samples"] == 3 and v["held_out"]["random"] == 2
    dop_row = res["budgets"][0]["methods"][0]
    assert dop_row["policy"]["meta"]["heldout_true_divergence"] == v["held_out"]["chosen_true"]
    report = (out / "report.md").read_text()
    assert "## Divergence from the unpruned model: in-sample and held-out" in report
    row = next(x for x in report.splitlines() if x.startswith("| 0.7 |")).split(" | ")
    assert v["in_sample"]["chosen_true"] != v["held_out"]["chosen_true"]
    assert row[2] == f"{v['in_sample']['chosen_true']:.4g}" and row[3] == f"{v['held_out']['chosen_true']:.4g}"


def test_run_compares_the_methods_of_docs_methods(tiny, tmp_path):
    """Issue 17, item 1: VTW, ShortV and GSOP run beside DOP: their policies are those of
    dop.search.methods on the same samples and budgets, a budget a method cannot meet is
    skipped with its note, and each policy's held-out divergence is its true divergence on
    the samples after the searched ones."""
    import torch

    from dop import Policy
    from dop.evaluate import load_dataset, load_model, prompt_builder_for
    from dop.runtime.replay import last_logits
    from dop.search import methods
    from dop.search.divergence import prepare_samples, true_divergence

    out = tmp_path / "m"
    args = _args(tiny, out) + ["--verify", "1", "--verify-samples", "2"]
    args[args.index("none")] = "vtw,shortv,gsop"
    args[args.index("tokens:1/3,0.9")] = "tokens:1/9,0.9"  # ShortV cannot reach tokens:1/9 (its keys and values stay)
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    model, proc = load_model(tiny)
    build = prompt_builder_for(tiny)
    held = prepare_samples(model, proc, load_dataset("shapes:val", limit=4)[2:], build)
    with torch.inference_mode():
        refs = [last_logits(model, s.inputs) for s in held]
    labels = {"vtw": "VTW", "shortv": "ShortV", "gsop": "GSOP"}
    n_met = n_unmet = 0
    for name, label in labels.items():
        direct = methods.search(name, model, proc, load_dataset("shapes:val", limit=2), budgets=["tokens:1/9", "0.9"],
                                ranker="spatial", build_prompt=build, progress=False)
        for r in direct.results:
            e = res["compared"][name]["budgets"][r.budget.spec]
            assert e["in_sample"] == pytest.approx(r.divergence, rel=1e-6, abs=1e-9)
            truth, _ = true_divergence(model, held, refs, r.policy, r.policy.ranker)
            assert e["held_out"] == pytest.approx(truth, rel=1e-5, abs=1e-9), (name, r.budget.spec)
            rows = [m for b in res["budgets"] if b["spec"] == r.budget.spec for m in b["methods"] if m["method"] == label]
            if r.met:
                n_met += 1
                assert len(rows) == 1 and Policy.from_dict(rows[0]["policy"]) == r.policy.replace(meta=rows[0]["policy"]["meta"])
            else:
                n_unmet += 1
                assert not rows
                assert {"budget": r.budget.spec, "method": label, "reason": r.note} in res["skipped"]
    assert n_met >= 3 and n_unmet >= 1
    report = (out / "report.md").read_text()
    assert "## Compared methods: divergence in-sample and held-out" in report and "| GSOP | 0.9 |" in report


@pytest.fixture(scope="module")
def tiny_two(tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    return [str(build_tiny_llava(root / name, seed=i)) for i, name in enumerate(("a", "b"))]


def test_run_two_models_side_by_side_and_resume(tiny_two, tmp_path, capsys):
    """Issue 17, item 5: `dop run --model A,B` runs the whole job per model in OUT/<model>/,
    writes one report with both models and results.json keyed per model; a rerun reuses
    every model's stages."""
    from dop.pipeline.job import slug as _slug

    out = tmp_path / "both"
    args = _args(",".join(tiny_two), out) + ["--verify", "0"]
    args[args.index("tokens:1/3,0.9")] = "0.9"
    args[args.index("none")] = "vtw"
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert all(f"model {m}" in printed for m in tiny_two)
    res = json.loads((out / "results.json").read_text())
    assert list(res["models"]) == tiny_two and res["dirs"] == {m: _slug(m) for m in tiny_two}
    report = (out / "report.md").read_text()
    head = next(x for x in report.splitlines() if x.startswith("| method |"))
    assert all(f"{m}: Rel. Avg." in head for m in tiny_two)
    for m in tiny_two:
        own = json.loads((out / _slug(m) / "results.json").read_text())
        assert own["options"]["model"] == m and own["budgets"] == res["models"][m]["budgets"]
        assert f"]({_slug(m)}/report.md)" in report and (out / _slug(m) / "report.md").is_file()
    # the DOP row holds each model's own FLOPs reduction, in the models' order
    row = next(x for x in report.splitlines() if x.startswith("| DOP (dop) |")).split(" | ")
    fractions = [res["models"][m]["budgets"][0]["methods"][0]["flops_fraction"] for m in tiny_two]
    assert [row[1], row[3]] == [f"{100 * (1 - f):.1f}%" for f in fractions]
    # each model's divergences include the compared methods' (in-sample; no held-out with --verify 0)
    for m in tiny_two:
        part = report.split(f"## `{m}`: divergences")[1].split("## ")[0]
        kl = res["models"][m]["compared"]["vtw"]["budgets"]["0.9"]["in_sample"]
        assert f"| VTW | 0.9 | {kl:.4g} | - |" in part
    assert main(args) == 0
    for m in tiny_two:
        again = json.loads((out / _slug(m) / "results.json").read_text())
        assert set(again["reused"]) >= {"search-dop", "eval-unpruned"}


@pytest.mark.parametrize("extra,match", [
    (["--verify", "0", "--verify-data", "shapes:val"], "apply only with --verify"),
    (["--verify-samples", "0"], "--verify-samples must be a positive integer"),
])
def test_run_verify_bad_inputs(tiny, tmp_path, capsys, extra, match):
    assert main(_args(tiny, tmp_path / "bad") + extra) == 2
    assert match in capsys.readouterr().err


def test_run_same_model_twice_is_refused(tiny, tmp_path, capsys):
    assert main(_args(f"{tiny},{tiny}", tmp_path / "twice")) == 2
    assert "give each model once" in capsys.readouterr().err
