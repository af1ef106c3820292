"""Spaces, compared methods and baselines are registries (docs/design.md, "Extension
points"): a toy of each, one file apiece in tests/toys/, is picked up by `dop search`,
`dop baseline` and `dop run` with no edit anywhere else."""

from __future__ import annotations

import importlib
import json

import pytest

from dop.baselines import BASELINES
from dop.cli import main
from dop.search import METHODS, SPACES, SpaceError, make_space
from fixtures_eval import build_tiny_llava

TOYS = {"toy": SPACES, "toy_method": METHODS, "toy_baseline": BASELINES}


@pytest.fixture(scope="module")
def toys():
    for name in ("toy_space", "toy_method", "toy_baseline"):
        importlib.import_module(f"toys.{name}")  # each registers itself
    yield
    for name, registry in TOYS.items():
        registry.unregister(name)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(build_tiny_llava(tmp_path_factory.mktemp("tiny") / "ckpt"))


def test_a_registry_names_its_entries_and_refuses_unknown_ones(toys):
    assert SPACES.names()[:2] == ("dop", "multigroup") and "toy" in SPACES
    assert {"gsop", "shortv", "vtw", "toy_method"} <= set(METHODS)
    assert METHODS.get("toy_method").label == "Toy"
    assert BASELINES.get("toy_baseline").prunes_before_llm
    with pytest.raises(ValueError, match="unknown search space 'nope'; known: dop, multigroup, toy"):
        SPACES.get("nope")
    with pytest.raises(ValueError, match="registered twice"):
        SPACES.register("toy", object)
    with pytest.raises(SpaceError, match="--space toy takes none of"):
        make_space("toy", 8, 16, min_tokens=2)


def test_dop_search_and_dop_baseline_pick_up_the_toys(toys, tiny, tmp_path, capsys):
    base = ["search", "--model", tiny, "--data", "shapes:val", "--samples", "2", "--budget", "0.6", "--no-progress",
            "--ranker", "spatial"]
    assert main(base + ["--space", "toy", "-o", str(tmp_path / "toy.json")]) == 0
    toy = json.loads((tmp_path / "toy.json").read_text())
    assert toy["meta"]["space"] == "toy" and list(toy["meta"]["params"]) == ["D"]
    assert main(base + ["--space", "toy_method", "-o", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["meta"]["method"] == "toy_method"
    capsys.readouterr()
    assert main(base + ["--space", "toy", "--groups", "0.5,1", "-o", str(tmp_path / "x.json")]) != 0
    assert "--groups applies to --space multigroup only" in capsys.readouterr().err  # before any work
    assert main(["baseline", "toy_baseline", "--model", tiny, "--tokens", "4", "-o", str(tmp_path / "b.json")]) == 0
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["ranker"] == "spatial" and b["meta"]["method"] == "toy_baseline" and b["meta"]["kept_tokens"] == 4
    capsys.readouterr()


def test_dop_run_compares_the_toys(toys, tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--model", tiny, "--samples", "2", "--test-samples", "2", "--budgets", "tokens:1/3",
                 "--space", "toy", "--methods", "toy_method", "--baselines", "toy_baseline", "--verify", "0",
                 "--ranker", "spatial", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["format"] == "dop-results/1"
    rows = {m["method"]: m["kind"] for m in res["budgets"][0]["methods"]}
    assert rows == {"DOP (toy)": "dop", "Toy": "method", "toy_baseline": "baseline"}
    assert list(res["tables"]) == ["toy"] and list(res["compared"]) == ["toy_method"]
    capsys.readouterr()


def test_search_config_is_checked_when_built():
    from dataclasses import replace

    from dop.search import SearchConfig

    cfg = SearchConfig(budget=0.5, budgets=["tokens:8"], space="multigroup", groups=(0.5, 1.0))
    assert cfg.specs == [0.5, "tokens:8"] and cfg.space_options()["groups"] == (0.5, 1.0)
    assert replace(cfg, seed=3).seed == 3 and cfg.seed == 0
    for bad, match in ((dict(verify_k=-1), "verify must be a non-negative integer"),
                       (dict(verify_draw="sorted"), "unknown draw 'sorted'"),
                       (dict(batch_size=0), "batch_size must be at least 1")):
        with pytest.raises(ValueError, match=match):
            SearchConfig(**bad)
