"""The `shapes` benchmark generator: determinism, balance, answers that match the drawing,
export layout and the `dop data export` command."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from dop.cli import main as cli_main
from dop.demo import shapes


def _same(a: dict, b: dict) -> bool:
    return (
        a["question"] == b["question"]
        and a["answers"] == b["answers"]
        and a["task"] == b["task"]
        and np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    )


def test_same_seed_same_samples_and_prefix_stable():
    a = shapes.make_samples("test", 12, seed=3)
    b = shapes.make_samples("test", 12, seed=3)
    assert all(_same(x, y) for x, y in zip(a, b))
    shorter = shapes.make_samples("test", 5, seed=3)
    assert all(_same(x, y) for x, y in zip(shorter, a[:5]))


@pytest.mark.parametrize(
    "other",
    [("test", 4), ("val", 3), ("train", 3)],
    ids=["other-seed", "other-split-val", "other-split-train"],
)
def test_other_seed_or_split_differs(other):
    a = shapes.make_samples("test", 10, seed=3)
    b = shapes.make_samples(other[0], 10, seed=other[1])
    differing = sum(not np.array_equal(np.asarray(x["image"]), np.asarray(y["image"])) for x, y in zip(a, b))
    assert differing == 10


def test_default_seeds_differ_per_split_and_stream_matches_train():
    val = shapes.make_samples("val", 5)
    test = shapes.make_samples("test", 5)
    assert not any(np.array_equal(np.asarray(x["image"]), np.asarray(y["image"])) for x, y in zip(val, test))
    stream = shapes.train_stream(7)
    from_stream = [next(stream) for _ in range(6)]
    assert all(_same(x, y) for x, y in zip(from_stream, shapes.make_samples("train", 6, seed=7)))


def test_sample_format():
    for s in shapes.make_samples("val", 10, seed=0):
        assert set(s) == {"image", "question", "answers", "task"}
        assert isinstance(s["image"], Image.Image) and s["image"].mode == "RGB"
        assert s["image"].size == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
        assert isinstance(s["question"], str) and s["question"].endswith("?")
        assert isinstance(s["answers"], list) and all(isinstance(a, str) for a in s["answers"])


def test_tasks_round_robin_and_answers_balanced():
    samples = shapes.make_samples("test", 1000, seed=11)
    assert [s["task"] for s in samples[:10]] == list(shapes.TASKS) * 2
    assert Counter(s["task"] for s in samples) == {t: 200 for t in shapes.TASKS}
    by_task: dict[str, Counter] = {t: Counter() for t in shapes.TASKS}
    for s in samples:
        assert s["answers"][0] in shapes.ANSWER_SETS[s["task"]]
        by_task[s["task"]][s["answers"][0]] += 1
    assert by_task["exist"] == {"yes": 100, "no": 100}
    for task in ("color", "count", "position"):
        counts = by_task[task]
        expected = 200 / len(shapes.ANSWER_SETS[task])
        assert set(counts) == set(shapes.ANSWER_SETS[task])
        assert max(counts.values()) < 1.6 * expected, (task, counts)
    assert len(by_task["read"]) > 25  # 200 draws over 36 strings
    # the majority answer is never much better than chance
    for task, counts in by_task.items():
        assert max(counts.values()) / 200 <= shapes.chance_accuracy(task) + 0.1


def test_subset_of_tasks_and_errors():
    samples = shapes.make_samples("val", 6, seed=0, tasks=["read", "count"])
    assert [s["task"] for s in samples] == ["read", "count"] * 3
    with pytest.raises(ValueError, match="known tasks"):
        shapes.make_samples("val", 3, tasks=["colour"])
    with pytest.raises(ValueError, match="known splits"):
        shapes.make_samples("dev", 3)
    with pytest.raises(ValueError, match="known tasks"):
        shapes.chance_accuracy("ocr")


def test_chance_accuracy():
    assert shapes.chance_accuracy("exist") == 0.5
    assert shapes.chance_accuracy("color") == pytest.approx(1 / 6)
    assert shapes.chance_accuracy("count") == pytest.approx(0.2)
    assert shapes.chance_accuracy("position") == 0.25
    assert shapes.chance_accuracy("read") == pytest.approx(1 / 36)


def _derive_answer(sample: dict, scene: shapes.Scene) -> str:
    """The answer recomputed from the scene's objects and the question's words."""
    q = sample["question"]
    objs = [o for o in scene.objects if o.kind == "shape"]
    task = sample["task"]
    if task == "exist":
        color, shape = re.fullmatch(r"Is there a (\w+) (\w+)\?", q).groups()
        return "yes" if any(o.color == color and o.name == shape for o in objs) else "no"
    if task == "color":
        (shape,) = re.fullmatch(r"What color is the (\w+)\?", q).groups()
        (target,) = [o for o in objs if o.name == shape]  # exactly one
        return target.color
    if task == "count":
        (plural,) = re.fullmatch(r"How many (\w+) are there\?", q).groups()
        shape = {v: k for k, v in shapes.PLURALS.items()}[plural]
        return str(sum(o.name == shape for o in objs))
    if task == "position":
        c1, s1, c2, s2 = re.fullmatch(r"Where is the (\w+) (\w+) relative to the (\w+) (\w+)\?", q).groups()
        (a,) = [o for o in objs if (o.color, o.name) == (c1, s1)]
        (b,) = [o for o in objs if (o.color, o.name) == (c2, s2)]
        dx, dy = a.cx - b.cx, a.cy - b.cy
        assert max(abs(dx), abs(dy)) > 15 and min(abs(dx), abs(dy)) < 5  # unambiguous
        if abs(dx) > abs(dy):
            return "left" if dx < 0 else "right"
        return "above" if dy < 0 else "below"
    if task == "read":
        assert q == "What is written on the label?"
        (label,) = [o for o in scene.objects if o.kind == "label"]
        chars = sorted((o for o in scene.objects if o.kind == "char"), key=lambda o: o.cx)
        assert "".join(o.name for o in chars) == label.name
        return label.name
    raise AssertionError(task)


def test_answers_match_the_scene_and_the_pixels():
    for sample, scene in shapes.make_scenes("test", 200, seed=5):
        assert _derive_answer(sample, scene) == sample["answers"][0]
        pixels = np.asarray(sample["image"])
        for o in scene.objects:
            x, y = int(round(o.cx)), int(round(o.cy))
            if o.kind == "shape":  # every shape covers its centre, in its exact colour
                assert tuple(pixels[y, x]) == shapes.COLORS[o.color], (o, tuple(pixels[y, x]))
            elif o.kind == "label":  # white box: its corners are white
                assert tuple(pixels[y - 7, x - 10]) == (255, 255, 255)
                assert tuple(pixels[y + 6, x + 9]) == (255, 255, 255)
        # objects sit in distinct grid cells, well inside the canvas
        cells = {(int(o.cx // shapes.CELL), int(o.cy // shapes.CELL)) for o in scene.objects if o.kind != "char"}
        assert len(cells) == sum(o.kind != "char" for o in scene.objects)


def test_read_label_text_is_drawn():
    """The label's dark pixels change with the string: the text is really in the image."""
    pairs = [(s, sc) for s, sc in shapes.make_scenes("test", 60, seed=2) if s["task"] == "read"]
    crops = {}
    for s, sc in pairs:
        (label,) = [o for o in sc.objects if o.kind == "label"]
        x, y = int(round(label.cx)), int(round(label.cy))
        crop = np.asarray(s["image"])[y - 7 : y + 7, x - 10 : x + 10].min(axis=2)
        assert (crop < 80).sum() > 15  # black strokes present
        crops[s["answers"][0]] = crop < 80
    masks = list(crops.values())
    assert len(masks) >= 5
    assert any(not np.array_equal(masks[0], m) for m in masks[1:])


def test_export_layout(tmp_path):
    out = shapes.export("test", 7, 4, tmp_path / "set")
    lines = (out / "data.jsonl").read_text().splitlines()
    assert len(lines) == 7
    expected = shapes.make_samples("test", 7, seed=4)
    for line, s in zip(lines, expected):
        row = json.loads(line)
        assert set(row) == {"image", "question", "answers", "task"}
        assert not row["image"].startswith("/") and row["image"].startswith("images/")
        assert (row["question"], row["answers"], row["task"]) == (s["question"], s["answers"], s["task"])
        with Image.open(out / row["image"]) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(s["image"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no temporary folder left
    with pytest.raises(ValueError, match="not an empty folder"):
        shapes.export("test", 3, 4, out)
    assert len((out / "data.jsonl").read_text().splitlines()) == 7  # untouched


def test_cli_export(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = cli_main(["data", "export", "shapes", "--split", "val", "--n", "6", "--seed", "9", "--out", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert [r["task"] for r in rows] == list(shapes.TASKS) + ["exist"]
    assert [r["question"] for r in rows] == [s["question"] for s in shapes.make_samples("val", 6, seed=9)]
    assert all((out / r["image"]).is_file() for r in rows)
    assert "wrote 6 samples" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["data", "export", "pictures", "--out", "X"], "known data sets: shapes"),
        (["data", "export", "shapes", "--split", "dev", "--out", "X"], "known splits"),
        (["data", "export", "shapes", "--n", "0", "--out", "X"], "must be positive"),
    ],
)
def test_cli_export_errors(tmp_path, capsys, argv, message):
    argv = [a if a != "X" else str(tmp_path / "o") for a in argv]
    assert cli_main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
