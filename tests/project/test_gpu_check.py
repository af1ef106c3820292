"""benchmarks/gpu_check.py in its CPU smoke mode (float32 only): the code a GPU machine will run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

import dop

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpu_check():
    path = ROOT / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_smoke_runs_every_part(gpu_check, tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    rc = gpu_check.main(["--device", "cpu", "--smoke", "--json", str(out)])
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert rc == 0, printed
    assert res["ok"]
    rows = res["exactness"]
    assert {r["family"] for r in rows} == {"llava", "llava_next", "qwen2_5_vl", "internvl", "llava_onevision"}
    assert len(rows) == 5 * len(gpu_check.TINY_POLICIES)
    for r in rows:
        assert (r["backend"], r["dtype"]) == ("sdpa", "float32") and r["ok"] and r["tokens_equal"] is True
        assert r["pruned_error"] <= r["tolerance"] < r["moved"]
    assert [(r["backend"], r["batch"]) for r in res["latency"]] == [("sdpa", 1), ("sdpa", 8)]
    for lat in res["latency"]:
        assert set(lat["median_s"]) == {"vanilla", "full", "dop@0.25", "short@0.25", "dop@0.14", "short@0.14"}
        assert [t["target"] for t in lat["targets"]] == [0.25, 0.14]
        for t in lat["targets"]:
            assert abs(t["flops_fraction"] - t["target"]) < 0.02 and abs(t["short_flops_fraction"] - t["target"]) < 0.02
    assert "pruned/short" in printed and "all checks passed" in printed


def test_a_wrong_ranking_fails_the_exactness_check(gpu_check, monkeypatch, tmp_path):
    """The runtime pruning other tokens than the reference must be caught (policies with
    one rank group prune every visual token alike, so the order cannot matter there)."""
    real = dop.apply_policy

    def misranked(model, policy, ranker=None, **kw):
        return real(model, policy, ranker=lambda ctx: [p[::-1] for p in ranker(ctx)], **kw)

    monkeypatch.setattr(gpu_check.dop, "apply_policy", misranked)
    out = tmp_path / "wrong.json"
    rc = gpu_check.main(["--device", "cpu", "--smoke", "--families", "llava", "--skip-latency", "--json", str(out)])
    assert rc == 1
    rows = json.loads(out.read_text())["exactness"]
    assert [r["ok"] for r in rows] == [len(p["groups"]) == 1 for p in gpu_check.TINY_POLICIES]
