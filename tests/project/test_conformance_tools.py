"""The opt-in conformance run's own pieces (tests/conformance/): the pytest plugin that applies
a policy to every model a transformers test builds, and the junit XML comparison."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import build_inputs, build_model

CONF = Path(__file__).resolve().parents[1] / "conformance"


def _load(name, alias):
    spec = importlib.util.spec_from_file_location(alias, CONF / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[alias] = mod
    spec.loader.exec_module(mod)
    return mod


plugin = _load("dop_conformance", "dop_conformance")
runner = _load("run", "dop_conformance_run")


@pytest.fixture
def installed():
    def install(spec):
        plugin.install(spec)
        return plugin

    yield install
    plugin.unwrap_all()


@torch.no_grad()
@pytest.mark.parametrize("fam", ["llava", "qwen2_5_vl"])
def test_plugin_applies_one_policy_per_outer_model(fam, installed):
    plain = build_model(fam)
    inputs, _ = build_inputs(plain, fam)
    vanilla = plain(**inputs).logits
    for spec, changes in (("noop", False), ("prune", True)):
        p = installed(spec)
        before = p.applied_count()
        model = build_model(fam)  # builds the inner *Model too: it must not get a policy of its own
        assert p.applied_count() == before + 1
        out = model(**inputs).logits
        assert changes == (not torch.equal(out, vanilla)), spec
        p.unwrap_all()
    before = plugin.applied_count()
    build_model(fam)
    assert plugin.applied_count() == before  # unwrapped: constructors are the originals again


def test_policies():
    noop, prune = plugin.make_policy("noop", 6), plugin.make_policy("prune", 6)
    assert noop.is_unpruned() and noop.groups == (0.5, 1.0)
    assert prune.kind_depths("attn_q") == prune.kind_depths("attn_kv") == prune.kind_depths("mlp") == [3]
    with pytest.raises(ValueError, match="noop"):
        plugin.install("/no/such/policy.json")


def _xml(cases: str) -> str:
    return f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{cases}</testsuite></testsuites>'


CLS = "tests.models.llava.test_modeling_llava.LlavaModelTest"
TB_TEST = "tests/models/llava/test_modeling_llava.py:10: in test_x\n    self.assertTrue(a)\nE   AssertionError"
TB_DOP = "tests/models/llava/test_modeling_llava.py:10: in t\n/w/src/dop/runtime/session.py:96: in pre_forward\nE ValueError"
TB_TF = "tests/models/llava/test_modeling_llava.py:10: in t\n/x/site-packages/transformers/cache_utils.py:5: in f\nE  AssertionError"
TB_CMP = "tests/models/llava/test_modeling_llava.py:10: in t\n/x/site-packages/torch/testing/_comparison.py:5: in f\nE  AssertionError"


def _case(name, body="", props=0):
    return (f'<testcase classname="{CLS}" name="{name}"><properties><property name="dop_policies_applied" '
            f'value="{props}"/></properties>{body}</testcase>')


def test_junit_classification_and_comparison(tmp_path):
    fail = '<failure message="{m}">{t}</failure>'
    plain = _xml("".join(_case(n) for n in ("a", "b", "c", "d", "e", "f"))
                 + _case("g", fail.format(m="AssertionError: unpatched", t=TB_TEST)))
    noop = _xml(_case("a", props=1) + _case("b", props=1) + _case("c", props=1)
                + _case("d", fail.format(m="ValueError: batch size 1", t=TB_DOP), props=1)
                + _case("e", props=2) + _case("f", '<skipped message="s"/>') + _case("g"))
    prune = _xml(_case("a", props=1)
                 + _case("b", fail.format(m="assert 1 == 2", t=TB_TEST), props=1)
                 + _case("c", fail.format(m="AssertionError: in the library", t=TB_TF), props=1)
                 + _case("d", '<error message="RuntimeError: setup">x</error>')
                 + _case("e", fail.format(m="Failed: Timeout (&gt;300.0s) from pytest-timeout.", t=TB_TEST))
                 + _case("f", fail.format(m="AssertionError: Tensor-likes are not close!", t=TB_CMP)) + _case("f"))
    res = {}
    for mode, text in (("plain", plain), ("noop", noop), ("prune", prune)):
        (tmp_path / f"junit-{mode}.xml").write_text(text)
        res[mode] = runner.read_junit(tmp_path / f"junit-{mode}.xml")
    assert res["prune"][f"{CLS}::c"].status == runner.CRASH and res["prune"][f"{CLS}::c"].origin == "transformers"
    assert res["noop"][f"{CLS}::d"].origin == "dop" and res["noop"][f"{CLS}::d"].exception == "ValueError"
    assert res["prune"][f"{CLS}::b"].exception == "AssertionError"
    s = runner.compare(res, ["llava"])
    assert s["totals"] == {"plain_passed": 6, "noop_failed": 2, "prune_crashed": 3, "prune_differs": 2,
                           "prune_passed": 1}
    assert [e["test"].rsplit(":", 1)[1] for e in s["noop_failures"]] == ["d", "f"]
    assert {e["test"].rsplit(":", 1)[1]: e["status"] for e in s["prune_crashes"]} == {
        "c": runner.CRASH, "d": runner.CRASH, "e": runner.TIMEOUT}
    assert [e["test"].rsplit(":", 1)[1] for e in s["prune_differences"]] == ["b", "f"]
    assert s["noop_policies_applied"] == 6
    md = runner.format_markdown(s, {"commit": "abc", "transformers": "5", "torch": "2", "date": "d",
                                    "families": ["llava"], "keyword": None, "ranker": "identity",
                                    "seconds": {"plain": 1.0}})
    assert "| llava | 6 | 2 | 3 | 2 | 1 |" in md and "`LlavaModelTest::b`" in md
    kv = "AssertionError: torch.Size([3, 4, 7, 8]) != (3, 4, 23, 8)"
    assert runner.reason_for(f"{CLS}::test_past_key_values_format", kv) == runner.KV_SHORT
    assert runner.reason_for(f"{CLS}::test_something_else", kv) == "unclassified"
    # the runner itself, summarising these files: --check fails on the no-op failures and crashes
    assert runner.main(["--from-junit", str(tmp_path), "--families", "llava", "--report", str(tmp_path / "r.md")]) == 0
    assert runner.main(["--from-junit", str(tmp_path), "--families", "llava", "--check",
                        "--report", str(tmp_path / "r.md")]) == 1
    assert "| llava | 6 | 2 | 3 | 2 | 1 |" in (tmp_path / "r.md").read_text()
