"""Fuzzing (issue 16): the policy loader, the JSONL reader and the divergence-table reader take
thousands of generated malformed inputs each and raise only their own error types (or
return a valid object). Derandomized, so a CI run is reproducible; EXAMPLES per test."""

from __future__ import annotations

import copy
import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dop.evaluate.datasets import DatasetError, load_jsonl  # noqa: E402
from dop.policy import Policy, PolicyError  # noqa: E402
from dop.search.table import DivergenceTable, TableError  # noqa: E402

EXAMPLES = 1000
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

# any JSON value, nested a few levels
SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=12)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)


def _mutations(good: dict):
    """A valid document with one part replaced, removed or added, at any depth."""
    paths = []

    def walk(node, path):
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + (k,))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, path + (i,))

    walk(good, ())

    @st.composite
    def mutate(draw):
        doc = copy.deepcopy(good)
        for _ in range(draw(st.integers(1, 3))):
            path = draw(st.sampled_from(paths))
            op = draw(st.sampled_from(["replace", "delete", "add"]))
            parent, key = None, None
            node = doc
            try:
                for k in path:
                    parent, key, node = node, k, node[k]
            except (KeyError, IndexError, TypeError):
                continue
            if op == "replace" and parent is not None:
                parent[key] = draw(JSON)
            elif op == "replace":
                doc = draw(JSON)
            elif op == "delete" and parent is not None:
                del parent[key]
            elif op == "add" and isinstance(node, dict):
                node[draw(st.text(max_size=8))] = draw(JSON)
            elif op == "add" and isinstance(node, list):
                node.append(draw(JSON))
        return doc

    return mutate()


def _text(doc) -> str:
    return json.dumps(doc, allow_nan=True)


# ---------------------------------------------------------------------- policy loader
GOOD_POLICY = {"format": "dop-policy/1", "num_layers": 8, "groups": [0.25, 0.5, 1.0],
               "depth": {"attn": [8, 4, 1], "mlp": [8, 2, 0]}, "ranker": "vispruner", "meta": {"budget": 0.2}}


@FUZZ
@given(doc=_mutations(GOOD_POLICY))
def test_fuzz_policy_documents(tmp_path_factory, doc):
    path = tmp_path_factory.getbasetemp() / "fuzz-policy.json"
    path.write_text(_text(doc))
    try:
        p = Policy.from_json(path)
    except PolicyError:
        return
    assert Policy.from_json(p.to_json()).to_dict() == p.to_dict()  # what loads, round-trips


@FUZZ
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode)
       | st.builds(lambda n, b: b"[" * n + b"]" * n, st.integers(0, 5000), st.just(0)))
def test_fuzz_policy_bytes(tmp_path_factory, raw):
    path = tmp_path_factory.getbasetemp() / "fuzz-policy.bin"
    path.write_bytes(raw)
    with pytest.raises(PolicyError):
        Policy.from_json(path)


# ---------------------------------------------------------------------- JSONL reader
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("fuzz-data")
    Image.new("RGB", (8, 8), (200, 10, 10)).save(d / "ok.png")
    (d / "not-an-image.png").write_bytes(b"not a png")
    return d


GOOD_ROW = {"image": "ok.png", "question": "what color?", "answers": ["red", "Red"], "task": "color"}


@FUZZ
@given(rows=st.lists(_mutations(GOOD_ROW) | JSON, min_size=1, max_size=3),
       image=st.sampled_from(["ok.png", "not-an-image.png", "missing.png", "", "/", "../ok.png", "a\0b"]))
def test_fuzz_jsonl_rows(data_dir, rows, image):
    for r in rows:
        if isinstance(r, dict) and r.get("image") == "ok.png":
            r["image"] = image
    (data_dir / "data.jsonl").write_text("\n".join(_text(r) for r in rows) + "\n")
    try:
        samples = load_jsonl(data_dir / "data.jsonl")
    except DatasetError:
        return
    assert all(s.answers and all(a.strip() for a in s.answers) for s in samples)


@FUZZ
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_fuzz_jsonl_bytes(data_dir, raw):
    (data_dir / "raw.jsonl").write_bytes(raw)
    try:
        load_jsonl(data_dir / "raw.jsonl")
    except DatasetError:
        pass


# ---------------------------------------------------------------------- divergence table reader
GOOD_TABLE = {"format": "dop-search-table/1", "key": {"model": "m", "measured": {"n_v": [0, 8], "D_mlp": [0, 2]}},
              "num_samples": 2, "entries": {"n_v": {"0": [0.5, 0.25], "8": [0.0, None]},
                                            "D_mlp": {"0": [1.0, 2.0], "2": [0.0, 0.0]}},
              "layer_evals": 10, "naive_layer_evals": 20, "wall_s": 1.5}


@FUZZ
@given(doc=_mutations(GOOD_TABLE))
def test_fuzz_table_documents(tmp_path_factory, doc):
    path = tmp_path_factory.getbasetemp() / "fuzz-table.json"
    path.write_text(_text(doc))
    try:
        t = DivergenceTable.load(str(path))
    except TableError:
        return
    for name, vals in t.entries.items():  # what loads is usable: means of complete entries work
        for v, per in vals.items():
            assert len(per) == t.num_samples


@FUZZ
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_fuzz_table_bytes(tmp_path_factory, raw):
    path = tmp_path_factory.getbasetemp() / "fuzz-table.bin"
    path.write_bytes(raw)
    with pytest.raises(TableError):
        DivergenceTable.load(str(path))
