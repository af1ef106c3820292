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
    assert t.depth == {"attn": (40, 30, 15, 3), "mlp": (40, 20, 8, 0)}  # 2 * 40/32 = 2.5 rounds up
    assert t.meta["transferred_from_layers"] == 32
    with pytest.raises(PolicyError, match="pass transfer=True"):
        p.check_layers(28)
    assert p.check_layers(28, transfer=True).depth["attn"] == (28, 21, 11, 2)  # 12 * 28/32 = 10.5 rounds up


def test_constructors():
    assert Policy.unpruned(8).is_unpruned()
    d = Policy.dop(32, 0.25, 20, 10)
    assert d.groups == (0.25, 1.0) and d.depth == {"attn": (20, 0), "mlp": (10, 0)}
    assert not d.is_unpruned()


@pytest.mark.parametrize("old,new,depth,expected", [
    (32, 40, [32, 24, 12, 2], [40, 30, 15, 3]),
    (40, 32, [40, 30, 15, 1], [32, 24, 12, 1]),   # 0.8 -> 1: never erased
    (8, 4, [7, 5, 3, 1], [4, 3, 2, 1]),           # half to even gave [4, 2, 2, 0]
    (32, 2, [32, 24, 12, 2], [2, 2, 1, 1]),
])
def test_transfer_rule_keeps_every_kept_operation(old, new, depth, expected):
    import warnings

    p = Policy(old, [0.125, 0.25, 0.5, 1.0], {"attn": depth, "mlp": [0, 0, 0, 0]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = p.transfer(new)
    assert list(t.depth["attn"]) == expected and t.depth["mlp"] == (0, 0, 0, 0)
    collapsed = len(set(expected)) < len(set(depth))
    assert [type(w.message).__name__ for w in caught] == (["TransferWarning"] if collapsed else [])


def test_transfer_depth_rule_on_every_depth():
    from dop.policy import transfer_depth

    for old in range(1, 41):
        for new in range(1, 41):
            mapped = [transfer_depth(d, old, new) for d in range(old + 1)]
            assert mapped[0] == 0 and mapped[old] == new
            assert all(m >= 1 for m in mapped[1:])  # a kept operation is never erased
            assert mapped == sorted(mapped)  # order of depths kept
            assert all(abs(m - d * new / old) <= 0.5 or m == 1 for d, m in enumerate(mapped))


def test_transfer_cli_warns_on_collapse(tmp_path, capsys):
    from dop.cli import main

    src = tmp_path / "p.json"
    Policy(32, [0.5, 1.0], {"attn": [20, 12]}).to_json(src)
    assert main(["transfer", str(src), "--num-layers", "2", "-o", str(tmp_path / "q.json")]) == 0
    assert "distinct depths collapse (12 and 20 -> 1)" in capsys.readouterr().err
    assert Policy.from_json(tmp_path / "q.json").depth == {"attn": (1, 1)}


# ---------------------------------------------------------------------- immutability (issue 15)
def test_a_built_policy_cannot_be_made_invalid():
    import dataclasses
    import operator

    p = Policy.from_dict(GOOD)
    for mutate in (
        lambda: operator.setitem(p.depth, "attn", [99, 0, 0, 0]),
        lambda: operator.setitem(p.depth["attn"], 0, 99),
        lambda: operator.setitem(p.groups, 0, 0.9),
        lambda: operator.setitem(p.meta, "model", "other"),
    ):
        with pytest.raises(TypeError):
            mutate()
    for name, value in (("num_layers", 3), ("depth", {"attn": [99] * 4}), ("ranker", 5)):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(p, name, value)
    assert p == Policy.from_dict(GOOD) and p.to_dict() == GOOD


def test_with_depth_and_replace_return_validated_new_policies():
    p = Policy.from_dict(GOOD)
    q = p.with_depth(mlp=[32, 32, 8, 1])
    assert q.depth == {"attn": (32, 24, 12, 2), "mlp": (32, 32, 8, 1)} and p.to_dict() == GOOD
    assert p.with_depth({"attn_q": [1, 1, 1, 1]}).depth == {"attn_q": (1, 1, 1, 1)}  # a whole new mapping
    with pytest.raises(PolicyError, match=r"depth.attn\[0\]: must lie in \[0, num_layers=32\], got 99"):
        p.with_depth(attn=[99, 0, 0, 0])
    with pytest.raises(PolicyError, match="'attn' may not be combined"):
        p.with_depth(attn_q=[1, 1, 1, 1])
    with pytest.raises(PolicyError, match="num_layers"):
        p.replace(num_layers=8)  # depths of 32 do not fit 8 layers
    r = p.replace(ranker="random", meta={"note": "x"})
    assert (r.ranker, dict(r.meta), r.depth) == ("random", {"note": "x"}, p.depth)
    assert p.with_meta(seed=3).meta == {**GOOD["meta"], "seed": 3}


def test_one_ranker_rule():
    p = Policy.from_dict(GOOD)
    assert p.ranker_or() == "vispruner" and p.ranker_or("random") == "random"
    assert p.replace(ranker=None).ranker_or() == "identity"
    fn = object()
    assert p.ranker_or(fn) is fn


def test_value_semantics_pickle_and_hash():
    import copy
    import pickle

    p = Policy.from_dict(GOOD)
    assert pickle.loads(pickle.dumps(p)) == p and copy.deepcopy(p) == p
    assert hash(p) == hash(Policy.from_dict(GOOD)) and len({p, Policy.from_dict(GOOD)}) == 1


def test_to_json_is_the_jsonio_writer(tmp_path, monkeypatch):
    import os

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    Policy.from_dict(GOOD).to_json(tmp_path / "p.json")
    assert synced and json.loads((tmp_path / "p.json").read_text()) == GOOD
    assert [f.name for f in tmp_path.iterdir()] == ["p.json"]  # no temporary file left
    with pytest.raises(FileNotFoundError):
        Policy.from_dict(GOOD).to_json(tmp_path / "missing" / "p.json")  # a folder is not made up


def test_policy_travels_with_a_checkpoint(tmp_path):
    p = Policy.from_dict(GOOD)
    path = p.save_pretrained(tmp_path)
    assert path == str(tmp_path / "dop_policy.json") and Policy.from_pretrained(tmp_path) == p
    from dop import save_policy

    assert save_policy(p.with_meta(x=1), tmp_path) == path and Policy.from_pretrained(tmp_path).meta["x"] == 1
    with pytest.raises(PolicyError, match="no dop_policy.json"):
        Policy.from_pretrained(tmp_path / "nothing")
    with pytest.raises(PolicyError, match="no such folder"):
        p.save_pretrained(tmp_path / "nothing")
