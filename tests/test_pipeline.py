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
            "--space", "dop", "--baselines", "spatial,random", "--ranker", "spatial", "--out", str(out),
            "--no-progress"]


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
