"""Hugging Face data sets as --data input (dop.evaluate.hf): parquet, save_to_disk folders,
column mapping, --columns, and one clear line for bad input. Skipped when `datasets` is not
installed (it comes with the hf and lmms extras), except the test of that very error."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
from PIL import Image

from dop.evaluate.datasets import DatasetError, load_dataset

try:
    import datasets as hfds
except ImportError:  # pragma: no cover - depends on the environment
    hfds = None

needs_datasets = pytest.mark.skipif(
    hfds is None, reason="the 'datasets' package is not installed (pip install torch==2.13.0 -e '.[hf]')")


def _png(color=(255, 0, 0), size=8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def _image_ds(rows: dict, image_col="image"):
    """A Dataset whose ``image_col`` holds PNG bytes cast to the Image feature."""
    return hfds.Dataset.from_dict(rows).cast_column(image_col, hfds.Image())


def test_missing_datasets_package_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"needs the 'datasets' package; pip install 'dop\[hf\]'"):
        load_dataset(str(tmp_path / "x.parquet"))


def test_columns_on_a_jsonl_or_shapes_spec_is_an_error():
    with pytest.raises(DatasetError, match="--columns applies to Hugging Face data sets"):
        load_dataset("shapes:test", limit=2, columns="question=q")
    with pytest.raises(DatasetError, match="unknown role 'quest'"):
        load_dataset("shapes:test", limit=2, columns="quest=q")


@needs_datasets
def test_export_hf_round_trips_the_shapes_samples(tmp_path):
    from dop.cli import main

    out = tmp_path / "hf"
    assert main(["data", "export", "shapes", "--format", "hf", "--n", "10", "--out", str(out)]) == 0
    assert (out / "shapes_test" / "shapes_test.yaml").is_file()  # the lmms-eval task folder beside the data
    template = (out / "shapes_test" / "_default_template_shapes_yaml").read_text()
    assert json.dumps(str((out / "shapes_test.parquet").resolve())) in template
    ref = load_dataset("shapes:test", limit=10)
    for spec in (str(out / "shapes_test.parquet"), str(out)):  # the file, or the folder holding it
        got = load_dataset(spec)
        assert [(s.question, s.answers, s.task) for s in got] == [(s.question, s.answers, s.task) for s in ref]
        for a, b in zip(got, ref):
            assert np.array_equal(np.asarray(a.load_image()), np.asarray(b.load_image()))
    five = load_dataset(str(out), limit=3, tasks=["count"])
    assert [s.task for s in five] == ["count", "count"] and five[0].question == ref[2].question


@needs_datasets
def test_save_to_disk_folders(tmp_path):
    ds = _image_ds({"image": [_png(), _png((0, 0, 255))], "question": ["q1?", "q2?"], "answer": ["red", "blue"]})
    ds.save_to_disk(str(tmp_path / "one"))
    got = load_dataset(str(tmp_path / "one"))
    assert [(s.question, s.answers, s.task) for s in got] == [("q1?", ["red"], "all"), ("q2?", ["blue"], "all")]
    assert got[1].load_image().getpixel((0, 0)) == (0, 0, 255)
    hfds.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "dict1"))
    assert len(load_dataset(str(tmp_path / "dict1"))) == 2
    hfds.DatasetDict({"val": ds, "test": ds}).save_to_disk(str(tmp_path / "dict2"))
    with pytest.raises(DatasetError, match=r"holds the splits val, test; pass one split's folder"):
        load_dataset(str(tmp_path / "dict2"))
    assert len(load_dataset(str(tmp_path / "dict2" / "test"))) == 2


@needs_datasets
def test_common_layouts_are_mapped(tmp_path):
    # VQAv2: `answers` as a list of {"answer": ...} records, `images` as a list of one image
    vqa = hfds.Dataset.from_dict({
        "images": [[_png()]], "question": ["what?"],
        "answers": [[{"answer": "cat", "answer_confidence": "yes"}, {"answer": "dog", "answer_confidence": "no"}]],
    }).cast_column("images", hfds.List(hfds.Image()))
    vqa.to_parquet(str(tmp_path / "vqa.parquet"))
    (s,) = load_dataset(str(tmp_path / "vqa.parquet"))
    assert s.answers == ["cat", "dog"] and s.load_image().size == (8, 8)

    # ScienceQA: `choices` list and an integer answer; a hint goes before the question
    sqa = _image_ds({"image": [_png()], "question": ["Which?"], "choices": [["x", "y", "z"]], "answer": [2],
                     "hint": ["Look."]})
    sqa.to_parquet(str(tmp_path / "sqa.parquet"))
    (s,) = load_dataset(str(tmp_path / "sqa.parquet"))
    assert s.answers == ["C"]
    assert s.question == "Look.\nWhich?\nA. x\nB. y\nC. z\nAnswer with the option's letter from the given choices directly."

    # MMBench: letter columns A..D (the last may be empty), the answer a letter, a category
    mmb = _image_ds({"image": [_png()], "question": ["Pick"], "A": ["p"], "B": ["q"], "C": ["r"], "D": [None],
                     "answer": ["B"], "category": ["ocr"]})
    mmb.to_parquet(str(tmp_path / "mmb.parquet"))
    (s,) = load_dataset(str(tmp_path / "mmb.parquet"), columns="task=category")
    assert s.answers == ["B"] and s.task == "ocr" and "\nC. r\nAnswer with" in s.question

    # --columns renames every role
    odd = _image_ds({"pic": [_png()], "ask": ["q?"], "gold": ["yes"]}, image_col="pic")
    odd.to_parquet(str(tmp_path / "odd.parquet"))
    (s,) = load_dataset(str(tmp_path / "odd.parquet"), columns={"image": "pic", "question": "ask", "answers": "gold"})
    assert (s.question, s.answers) == ("q?", ["yes"])


@needs_datasets
@pytest.mark.parametrize("case, pattern", [
    ("missing", r"odd\.parquet: no question column \(looked for question, query, prompt; columns: image, ask, "
                r"answer\); name it with --columns question=COLUMN"),
    ("bad_override", r"--columns question=nope: no column 'nope'"),
    ("not_image", r"bad\.parquet row 1, column 'image': not an image"),
    ("two_images", r"two\.parquet row 0, column 'images': holds 2 images"),
    ("empty", r"empty\.parquet: the split is empty \(0 rows\)"),
    ("no_answer", r"noans\.parquet row 0, column 'answer': expected an answer"),
    ("bad_option_answer", r"opt\.parquet row 0, column 'answer': answer 'maybe' is neither"),
    ("hub_offline", r"hf:lmms-lab/GQA:testdev_balanced_instructions:testdev: hub data sets need the network"),
    ("hub_malformed", r"expected hf:OWNER/NAME:SPLIT"),
])
def test_bad_input_is_one_line_naming_row_and_column(tmp_path, monkeypatch, case, pattern):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    kwargs = {}
    if case in ("missing", "bad_override"):
        _image_ds({"image": [_png()], "ask": ["q"], "answer": ["a"]}).to_parquet(str(tmp_path / "odd.parquet"))
        spec = str(tmp_path / "odd.parquet")
        kwargs = {"columns": "question=nope"} if case == "bad_override" else {}
    elif case == "not_image":
        hfds.Dataset.from_dict({"image": [_png(), b"not a png"], "question": ["q", "q"], "answer": ["a", "a"]}) \
            .to_parquet(str(tmp_path / "bad.parquet"))
        spec = str(tmp_path / "bad.parquet")
    elif case == "two_images":
        hfds.Dataset.from_dict({"images": [[_png(), _png()]], "question": ["q"], "answer": ["a"]}) \
            .cast_column("images", hfds.List(hfds.Image())).to_parquet(str(tmp_path / "two.parquet"))
        spec = str(tmp_path / "two.parquet")
    elif case == "empty":
        hfds.Dataset.from_dict({"image": [], "question": [], "answer": []},
                               features=hfds.Features({"image": hfds.Image(), "question": hfds.Value("string"),
                                                       "answer": hfds.Value("string")})) \
            .to_parquet(str(tmp_path / "empty.parquet"))
        spec = str(tmp_path / "empty.parquet")
    elif case == "no_answer":
        _image_ds({"image": [_png()], "question": ["q"], "answer": [None]}).to_parquet(str(tmp_path / "noans.parquet"))
        spec = str(tmp_path / "noans.parquet")
    elif case == "bad_option_answer":
        _image_ds({"image": [_png()], "question": ["q"], "options": [["a", "b"]], "answer": ["maybe"]}) \
            .to_parquet(str(tmp_path / "opt.parquet"))
        spec = str(tmp_path / "opt.parquet")
    elif case == "hub_offline":
        spec = "hf:lmms-lab/GQA:testdev_balanced_instructions:testdev"
    else:
        spec = "hf:GQA"
    with pytest.raises(DatasetError, match=pattern) as e:
        load_dataset(spec, **kwargs)
    assert "\n" not in str(e.value)


@needs_datasets
def test_cli_eval_reads_parquet_with_columns(tmp_path, capsys):
    from dop.cli import main

    out = tmp_path / "hf"
    assert main(["data", "export", "shapes", "--format", "hf", "--n", "5", "--split", "val", "--out", str(out)]) == 0
    assert not (out / "shapes_test").exists()  # the lmms-eval task folder comes with the test split only
    rc = main(["eval", "--model", "demo", "--data", str(out / "shapes_val.parquet"), "--columns",
               "answers=answer", "--no-progress", "--no-baseline", "--json", str(tmp_path / "a.json")])
    assert rc == 0
    got = json.loads((tmp_path / "a.json").read_text())
    assert main(["eval", "--model", "demo", "--data", "shapes:val", "--limit", "5", "--no-progress",
                 "--json", str(tmp_path / "b.json")]) == 0
    ref = json.loads((tmp_path / "b.json").read_text())
    assert [s["prediction"] for s in got["samples"]] == [s["prediction"] for s in ref["samples"]]
    assert got["tasks"] == ref["tasks"]
    capsys.readouterr()
    assert main(["eval", "--model", "demo", "--data", str(out), "--columns", "question=nope"]) == 2
    assert "no column 'nope'" in capsys.readouterr().err


@needs_datasets
def test_hub_spec_takes_a_split_or_a_configs_only_split(monkeypatch):
    """The hub itself cannot be reached here: datasets.load_dataset is replaced by a stand-in
    that answers as the hub does for a data set with two configs (GQA's layout)."""
    ds = _image_ds({"image": [_png()], "question": ["q?"], "answer": ["a"]})
    calls = []

    def fake_load_dataset(repo, name=None, split=None):
        calls.append((repo, name, split))
        if name is None:
            raise ValueError("Config name is missing.\nPlease pick one among the available configs: ['x', 'y']")
        dd = hfds.DatasetDict({"testdev": ds} if name == "x" else {"a": ds, "b": ds})
        return dd if split is None else dd[split]

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(hfds, "load_dataset", fake_load_dataset)
    assert [s.question for s in load_dataset("hf:org/gqa:x:testdev")] == ["q?"]
    assert [s.question for s in load_dataset("hf:org/gqa:x")] == ["q?"]
    assert calls[-2:] == [("org/gqa", None, "x"), ("org/gqa", "x", None)]
    with pytest.raises(DatasetError, match=r"hf:org/gqa:y: config 'y' has the splits a, b; use hf:org/gqa:y:SPLIT"):
        load_dataset("hf:org/gqa:y")
    with pytest.raises(DatasetError, match=r"hf:org/gqa:x:nosplit: cannot load from the hub \(KeyError"):
        load_dataset("hf:org/gqa:x:nosplit")
