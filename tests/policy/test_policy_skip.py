"""Per-layer skips: format 2, validation, canonical form, semantics, transfer
(docs/design.md, "Per-layer skips")."""

from __future__ import annotations

import json
import warnings

import pytest

from dop import Policy, PolicyError
from dop.flops import count_flops
from dop.policy import TransferWarning, transfer_depth, transfer_layer

SKIP = {
    "format": "dop-policy/2",
    "num_layers": 8,
    "groups": [0.25, 1.0],
    "depth": {"attn": [8, 6], "mlp": [8, 4]},
    "skip": {"attn_q": [[2, 5], []], "mlp": [[], [1, 3]]},
    "meta": {},
}


def _with_skip(**changes):
    d = json.loads(json.dumps(SKIP))
    d.update(changes)
    return d


def test_format2_round_trip(tmp_path):
    p = Policy.from_dict(SKIP)
    path = tmp_path / "p.json"
    p.to_json(path)
    assert json.loads(path.read_text()) == SKIP
    q = Policy.from_json(path)
    assert q == p and hash(q) == hash(p) and q.skip == p.skip


def test_no_skip_writes_format1_byte_for_byte():
    depth_only = Policy(8, [0.25, 1.0], {"attn": [8, 6]})
    for empty in (None, {}, {"mlp": [[], []]}, {"attn_q": [[], [6, 7]]}):  # 6, 7: at or past depth 6
        p = Policy(8, [0.25, 1.0], {"attn": [8, 6]}, skip=empty)
        assert p == depth_only and hash(p) == hash(depth_only)
        assert p.to_json() == depth_only.to_json()
        assert json.loads(p.to_json())["format"] == "dop-policy/1" and "skip" not in p.to_dict()
    # format 2 without skip is read as well
    d = depth_only.to_dict()
    d["format"] = "dop-policy/2"
    assert Policy.from_dict(d) == depth_only


def test_canonical_form_sorts_and_drops_entries_past_the_depth():
    p = Policy(8, [0.25, 1.0], {"mlp": [8, 4]}, skip={"mlp": [[5, 1], [6, 2, 3]], "attn": [[7, 0], []]})
    assert p.skip == {"mlp": ((1, 5), (2, 3)), "attn": ((0, 7), ())}
    assert p == Policy(8, [0.25, 1.0], {"mlp": [8, 4]}, skip={"attn": [[0, 7], []], "mlp": [[1, 5], [3, 2, 5]]})


@pytest.mark.parametrize("skip,field,rule", [
    ({"mlp": [[1], [9]]}, "skip.mlp[1][0]", "[0, num_layers=8)"),
    ({"mlp": [[1], [-1]]}, "skip.mlp[1][0]", "[0, num_layers=8)"),
    ({"mlp": [[1, 1], []]}, "skip.mlp[0]", "listed twice"),
    ({"mlp": [[1]]}, "skip.mlp", "one list of layers per group (2)"),
    ({"mlp": [[1.0], []]}, "skip.mlp[0][0]", "must be an integer"),
    ({"mlp": [[True], []]}, "skip.mlp[0][0]", "must be an integer"),
    ({"mlp": [3, []]}, "skip.mlp[0]", "list of layer indices"),
    ({"mlp": "1"}, "skip.mlp", "one list of layers per group"),
    ({"ffn": [[], []]}, "skip", "unknown op kind"),
    ({"attn": [[], []], "attn_kv": [[], []]}, "skip", "may not be combined"),
    ({"mlp": [list(range(8)) + [0], []]}, "skip.mlp[0]", "more than num_layers=8"),
    ([1, 2], "skip", "must be an object"),
])
def test_invalid_skips_name_field_and_rule(skip, field, rule):
    with pytest.raises(PolicyError) as e:
        Policy.from_dict(_with_skip(skip=skip))
    assert field in str(e.value) and rule in str(e.value)


def test_format_errors():
    with pytest.raises(PolicyError, match=r"skip: per-layer skips need .*dop-policy/2"):
        Policy.from_dict(_with_skip(format="dop-policy/1"))
    with pytest.raises(PolicyError, match="unknown format 'dop-policy/3'"):
        Policy.from_dict(_with_skip(format="dop-policy/3"))


def test_semantics_follow_the_rule():
    p = Policy.from_dict(SKIP)
    L = p.num_layers
    rule = {  # l < depth[k][g] and l not in skip[k][g], written out by hand from SKIP
        ("attn_q", 0): [l not in (2, 5) for l in range(L)],
        ("attn_q", 1): [l < 6 for l in range(L)],
        ("attn_kv", 0): [True] * L,
        ("attn_kv", 1): [l < 6 for l in range(L)],
        ("mlp", 0): [True] * L,
        ("mlp", 1): [l < 4 and l not in (1, 3) for l in range(L)],
    }
    for (k, g), want in rule.items():
        assert [p.processed(k, g, l) for l in range(L)] == want, (k, g)
    # 8 tokens: 2 in group 0, 6 in group 1
    assert [p.tokens_processed("mlp", l, 8) for l in range(L)] == [8, 2, 8, 2, 2, 2, 2, 2]
    assert [p.tokens_processed("attn_q", l, 8) for l in range(L)] == [8, 8, 6, 8, 8, 6, 2, 2]
    assert p.max_active_depth() == 1 and not p.is_unpruned()
    assert p.kind_skip("attn_kv") == [(), ()] and p.kind_skip("mlp") == [(), (1, 3)]
    assert Policy(8, [1.0], {}, skip={"attn": [[3]]}).kind_skip("attn_kv") == [(3,)]
    with pytest.raises(ValueError, match="group 2 out of range"):
        p.processed("mlp", 2, 0)


def test_n_keep_counts_groups_processed_somewhere():
    # group 1's MLP runs nowhere (depth 2, both layers skipped); its attention does
    p = Policy(4, [0.5, 1.0], {"mlp": [4, 2], "attn": [4, 0]}, skip={"mlp": [[0], [0, 1]]})
    assert p.n_keep(10) == 5
    assert p.with_skip(mlp=[[0], [0]]).n_keep(10) == 10
    assert Policy.dop(8, 0.25, 4, 2).n_keep(16) == 4  # the depth form as before


def test_with_skip_replaces_and_validates():
    p = Policy(8, [0.5, 1.0], {"attn": [8, 2]})
    q = p.with_skip(mlp=[[3], []])
    assert q.skip == {"mlp": ((3,), ())} and p.skip == {}
    assert q.with_skip({}) == p
    assert Policy(8, [0.5, 1.0], {"attn": [8, 2]}, None, None, {"mlp": [[3], []]}) == q  # the agreed signature
    with pytest.raises(PolicyError, match=r"skip.mlp\[0\]\[0\]"):
        p.with_skip(mlp=[[8], []])
    with pytest.raises(TypeError):
        q.skip["mlp"] = ((1,), ())


def test_transfer_layer_rule_agrees_with_transfer_depth():
    for old in range(1, 13):
        for new in range(1, 13):
            for d in range(old + 1):
                below = sum(transfer_layer(j, old, new) < d for j in range(new))
                assert below == transfer_depth(d, old, new) or (below == 0 and transfer_depth(d, old, new) == 1)


def test_transfer_rescales_skips():
    p = Policy(8, [1.0], {}, skip={"attn_q": [[1, 2, 6]], "mlp": [[1, 2, 6]]})
    up = p.transfer(16)
    assert up.skip == {"attn_q": ((2, 3, 4, 5, 12, 13),), "mlp": ((2, 3, 4, 5, 12, 13),)}
    assert Policy.from_json(up.to_json()) == up
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        down = p.transfer(4)
    assert down.skip == {"attn_q": ((1, 3),), "mlp": ((1, 3),)}
    with pytest.warns(TransferWarning, match=r"skip.mlp\[0\]"):
        gone = Policy(8, [1.0], {}, skip={"mlp": [[1, 3]]}).transfer(4)
    assert gone.skip == {} and gone.to_dict()["format"] == "dop-policy/1"


def test_pickle_and_repr():
    import pickle

    p = Policy.from_dict(SKIP)
    assert pickle.loads(pickle.dumps(p)) == p
    assert "skip=" in repr(p) and "skip=" not in repr(Policy.unpruned(8))


def test_policy_map_marks_the_holes(tmp_path):
    from dop.report.plots import policy_map, skip_cells

    p = Policy.from_dict(SKIP)  # attn_q holes at 2 and 5 (group 0), mlp at 1 and 3 (group 1)
    assert skip_cells(p) == [(0, 2), (0, 5), (2, 1), (2, 3)]  # rows: attn_q, attn_kv, mlp
    assert skip_cells(p.with_skip({})) == []
    policy_map(p, 16, tmp_path / "map.png")
    assert (tmp_path / "map.png").stat().st_size > 1000


def test_cli_reads_format2(tmp_path, capsys):
    """`dop flops` and `dop transfer` read per-layer policies through Policy.from_json."""
    from dop.cli import main

    path = tmp_path / "p.json"
    big = Policy(32, [0.25, 1.0], {"attn": [32, 16]}, skip={"mlp": [[4, 9], [1, 2, 3]]})
    big.to_json(path)
    assert main(["flops", "--model", "llava-1.5-7b", "--policy", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["dop"]
    shape = dict(num_visual_tokens=out["num_visual_tokens"], num_text_tokens=out["num_text_tokens"])
    want = count_flops("llava-1.5-7b", big, **shape).decoder
    assert out["decoder"] == want < count_flops("llava-1.5-7b", big.with_skip({}), **shape).decoder
    dest = tmp_path / "q.json"
    assert main(["transfer", str(path), "--num-layers", "16", "-o", str(dest)]) == 0
    assert Policy.from_json(dest) == big.transfer(16)
    assert json.loads(dest.read_text())["format"] == "dop-policy/2"
    err = capsys.readouterr().err  # the skips are said
    assert f"32 -> 16 layers, {big.transfer(16).describe()}; wrote" in err and "skip {'mlp': [[2], [1]]}" in err


def test_describe_names_the_skips():
    """Policy.describe: a policy with per-layer skips only is not "unpruned"; the skips are
    said beside the depths, as layer runs per rank range."""
    shortv = Policy(8, [1.0], {}, skip={"attn_q": [[2, 3, 4, 6]], "mlp": [[2, 3, 4, 6]]})
    assert shortv.describe() == "groups [1.0] depth {} skip {'attn_q': [[2, 3, 4, 6]], 'mlp': [[2, 3, 4, 6]]}"
    assert shortv.describe(144) == "attn_q skipped: ranks 0-143 at layers 2-4, 6; mlp skipped: ranks 0-143 at layers 2-4, 6"
    both = Policy(8, [0.25, 1.0], {"attn": [8, 2]}, skip={"mlp": [[1, 5], []]})
    assert both.describe(144) == "attn: ranks 0-35 to layer 8, ranks 36-143 to layer 2; mlp skipped: ranks 0-35 at layers 1, 5"
    assert both.describe() == "groups [0.25, 1.0] depth {'attn': [8, 2]} skip {'mlp': [[1, 5], []]}"
    depth_only = both.with_skip({})
    assert depth_only.describe() == "groups [0.25, 1.0] depth {'attn': [8, 2]}"
    assert depth_only.describe(144) == "attn: ranks 0-35 to layer 8, ranks 36-143 to layer 2"
    assert Policy.unpruned(8).describe() == Policy.unpruned(8).describe(144) == "unpruned"
    assert Policy(8, [1.0], {"mlp": [8]}).describe(144) == "unpruned"  # full depth prunes nothing
