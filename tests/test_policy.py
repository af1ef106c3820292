"""Policy schema, validation, JSON round trip and transfer (docs/design.md, "Policies")."""

from __future__ import annotations

import json

import pytest

from dop import Policy, PolicyError

GOOD = {
    "format": "dop-policy/1",
    "num_layers": 32,
    "groups": [0.125, 0.25, 0.5, 1.0],
    "depth": {"attn": [32, 24, 12, 2], "mlp": [32, 16, 6, 0]},
    "ranker": "vispruner",
    "meta": {"model": "llava-hf/llava-1.5-7b-hf", "budget": 0.14, "samples": 25},
}


def _with(**changes):
    d = json.loads(json.dumps(GOOD))
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    return d


def test_round_trip(tmp_path):
    p = Policy.from_dict(GOOD)
    path = tmp_path / "p.json"
    p.to_json(path)
    q = Policy.from_json(path)
    assert q == p
    assert json.loads(path.read_text()) == GOOD


@pytest.mark.parametrize("data,field,rule", [
    (_with(format="dop-policy/9"), "format", "unknown format"),
    (_with(format=None), "format", "missing"),
    (_with(num_layers=0), "num_layers", "positive integer"),
    (_with(num_layers="32"), "num_layers", "positive integer"),
    (_with(groups=[0.5, 0.25, 1.0]), "groups", "strictly increasing"),
    (_with(groups=[0.25, 0.5, 0.9]), "groups", "last fraction must be 1.0"),
    (_with(groups=[0.0, 0.5, 0.75, 1.0]), "groups[0]", "(0, 1]"),
    (_with(groups=["a", 0.5, 0.75, 1.0]), "groups[0]", "must be a number"),
    (_with(groups=[]), "groups", "non-empty"),
    (_with(depth={"attn": [32, 24, 12, 33], "mlp": [32, 16, 6, 0]}), "depth.attn[3]", "[0, num_layers=32]"),
    (_with(depth={"attn": [32, 24, 12, -1], "mlp": [32, 16, 6, 0]}), "depth.attn[3]", "[0, num_layers=32]"),
    (_with(depth={"attn": [32, 24, 12], "mlp": [32, 16, 6, 0]}), "depth.attn", "one depth per group"),
    (_with(depth={"attn": [32, 24, 12, 2], "attn_q": [1, 1, 1, 1]}), "depth", "may not be combined"),
    (_with(depth={"ffn": [1, 1, 1, 1]}), "depth", "unknown op kind"),
    (_with(depth={"attn": [32, 24, 12.5, 2]}), "depth.attn[2]", "must be an integer"),
    (_with(depth={"attn": [32, 24, True, 2]}), "depth.attn[2]", "must be an integer"),
    (_with(depth={"attn": "32"}), "depth.attn", "list of integers"),
    (_with(ranker=5), "ranker", "string"),
])
def test_invalid_policies_name_field_and_rule(data, field, rule):
    with pytest.raises(PolicyError) as e:
        Policy.from_dict(data)
    assert field in str(e.value) and rule in str(e.value)


@pytest.mark.parametrize("text,rule", [
    ("", "empty file"),
    ("   \n", "empty file"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
])
def test_bad_files(tmp_path, text, rule):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(PolicyError, match=rule) as e:
        Policy.from_json(path)
    assert "bad.json" in str(e.value)


def test_missing_file_and_no_pickle(tmp_path):
    with pytest.raises(PolicyError, match="no such file"):
        Policy.from_json(tmp_path / "nope.json")
    import pickle

    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps(GOOD))
    with pytest.raises(PolicyError):
        Policy.from_json(path)


def test_group_bounds_and_counts():
    p = Policy.from_dict(GOOD)
    assert p.group_bounds(576) == [(0, 72), (72, 144), (144, 288), (288, 576)]
    # floor(f * N + 1e-9): 0.1 * 30 = 3.0000000000000004 -> 3, 0.3*10 = 2.9999999999999996 -> 3
    q = Policy(4, [0.3, 1.0], {"attn": [4, 0]})
    assert q.group_bounds(10) == [(0, 3), (3, 10)]
    assert p.tokens_processed("attn_q", 0, 576) == 576
    assert p.tokens_processed("attn_q", 2, 576) == 288
    assert p.tokens_processed("mlp", 6, 576) == 144
    assert p.tokens_processed("mlp", 31, 576) == 72
    assert p.n_keep(576) == 576
    assert Policy.token_pruning(32, 0.25).n_keep(576) == 144
    assert p.kind_depths("attn_kv") == [32, 24, 12, 2]
    assert Policy(4, [1.0], {"mlp": [2]}).kind_depths("attn_q") == [4]


def test_transfer():
    p = Policy.from_dict(GOOD)
    t = p.transfer(40)
    assert t.num_layers == 40
    assert t.depth == {"attn": [40, 30, 15, 2], "mlp": [40, 20, 8, 0]}
    assert t.meta["transferred_from_layers"] == 32
    with pytest.raises(PolicyError, match="pass transfer=True"):
        p.check_layers(28)
    assert p.check_layers(28, transfer=True).depth["attn"] == [28, 21, 10, 2]


def test_constructors():
    assert Policy.unpruned(8).is_unpruned()
    d = Policy.dop(32, 0.25, 20, 10)
    assert d.groups == [0.25, 1.0] and d.depth == {"attn": [20, 0], "mlp": [10, 0]}
    assert not d.is_unpruned()
