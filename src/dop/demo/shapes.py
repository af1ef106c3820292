"""`shapes`: a deterministic, seeded synthetic VQA benchmark.

Every image is a 96 x 96 RGB canvas (noisy background, small coloured specks as
clutter) holding 3-7 coloured shapes placed in a 4 x 4 grid of 24 px cells (with a
little jitter) and one white label with a two-letter string. Five tasks, each a small
cousin of a real benchmark:

========  ==========================================  ==================================
task      question                                    answers (chance)
========  ==========================================  ==================================
exist     ``Is there a red circle?``                  yes / no, alternating (1/2)
color     ``What color is the triangle?``             one of 6 colours, uniform (1/6)
count     ``How many squares are there?``             0-4, uniform (1/5)
position  ``Where is the red circle relative to the   left / right / above / below,
          blue square?``                              uniform (1/4)
read      ``What is written on the label?``           two letters from ``AEHKRT`` (1/36)
========  ==========================================  ==================================

Splits are strings mixed into the random seed, so ``train``/``val``/``test`` never share
samples; any seed gives a fresh split of the same distribution. Sample ``i`` depends
only on (split, seed, i), so a longer list extends a shorter one.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..outputs import folder_written_whole

TASKS: tuple[str, ...] = ("exist", "color", "count", "position", "read")
SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_SEEDS: dict[str, int] = {"train": 0, "val": 1, "test": 2}

IMAGE_SIZE = 96
CELL = 24  # 4 x 4 grid of cells; every object is centred in its own cell
GRID = IMAGE_SIZE // CELL
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (20, 160, 40),
    "blue": (30, 60, 230),
    "yellow": (240, 210, 20),
    "purple": (150, 40, 190),
    "cyan": (20, 200, 210),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
LETTERS = "AEHKRT"
READ_ANSWERS: tuple[str, ...] = tuple(a + b for a in LETTERS for b in LETTERS)
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
COUNTS: tuple[str, ...] = ("0", "1", "2", "3", "4")

# every answer each task can give; chance is 1 / len (all are drawn uniformly or alternate)
ANSWER_SETS: dict[str, tuple[str, ...]] = {
    "exist": ("yes", "no"),
    "color": tuple(COLORS),
    "count": COUNTS,
    "position": RELATIONS,
    "read": READ_ANSWERS,
}


@dataclass
class Obj:
    """One thing drawn: a shape, or one character of the label. ``role`` is 1 for the
    object the question is about (first letter for `read`), 2 for the second one
    (reference object for `position`, second letter for `read`), else 0."""

    kind: str  # "shape" or "char"
    name: str  # shape name or the character
    color: str | None
    cx: float
    cy: float
    size: int
    role: int = 0


@dataclass
class Scene:
    objects: list[Obj] = field(default_factory=list)
    label: str = ""


def chance_accuracy(task: str) -> float:
    """Accuracy of guessing: every task's answer is uniform over its answer set (``exist``
    alternates yes/no), so uniform guessing and always giving the majority answer both
    score ``1 / len(ANSWER_SETS[task])``: exist 0.5, color 1/6, count 0.2, position 0.25,
    read 1/36."""
    if task not in ANSWER_SETS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    return 1.0 / len(ANSWER_SETS[task])


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default(size=14)


def _check_tasks(tasks) -> tuple[str, ...]:
    tasks = TASKS if tasks is None else tuple(tasks)
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ValueError(f"unknown task(s) {bad or tasks!r}; known tasks: {', '.join(TASKS)}")
    return tasks


def _rng(split: str, seed: int, index: int) -> random.Random:
    return random.Random(f"shapes/{split}/{seed}/{index}")


def _other_pair(rng: random.Random, avoid: set[tuple[str, str]], shapes=SHAPES) -> tuple[str, str]:
    while True:
        pair = (rng.choice(tuple(COLORS)), rng.choice(shapes))
        if pair not in avoid:
            return pair


class _Cells:
    """The free grid cells of one scene, in a random order."""

    def __init__(self, rng: random.Random):
        self.cells = [(r, c) for r in range(GRID) for c in range(GRID)]
        rng.shuffle(self.cells)

    def take(self, pred=lambda rc: True) -> tuple[int, int]:
        for i, rc in enumerate(self.cells):
            if pred(rc):
                return self.cells.pop(i)
        raise RuntimeError("no free cell")  # cannot happen with <= 8 objects in 16 cells


Placed = list  # (color, shape, role, cell) per object


def _exist(rng: random.Random, cells: _Cells, placed: Placed, k: int) -> tuple[str, str]:
    colors, shapes = tuple(COLORS), SHAPES
    target = (rng.choice(colors), rng.choice(shapes))
    answer = "yes" if k % 2 == 0 else "no"
    n_other = rng.randint(2, 5)
    if answer == "yes":
        placed.append((*target, 1, cells.take()))
    else:  # hard negatives: same colour other shape, same shape other colour
        n_other += 1
        placed.append((target[0], rng.choice([s for s in shapes if s != target[1]]), 0, cells.take()))
        placed.append((rng.choice([c for c in colors if c != target[0]]), target[1], 0, cells.take()))
        n_other -= 2
    for _ in range(n_other):
        placed.append((*_other_pair(rng, {target}), 0, cells.take()))
    return f"Is there a {target[0]} {target[1]}?", answer


def _color(rng: random.Random, cells: _Cells, placed: Placed, k: int) -> tuple[str, str]:
    colors, shapes = tuple(COLORS), SHAPES
    shape = rng.choice(shapes)
    answer = rng.choice(colors)
    placed.append((answer, shape, 1, cells.take()))
    others = [s for s in shapes if s != shape]
    for _ in range(rng.randint(2, 5)):
        placed.append((rng.choice(colors), rng.choice(others), 0, cells.take()))
    return f"What color is the {shape}?", answer


def _count(rng: random.Random, cells: _Cells, placed: Placed, k: int) -> tuple[str, str]:
    colors, shapes = tuple(COLORS), SHAPES
    shape = rng.choice(shapes)
    n = rng.randint(0, 4)
    for _ in range(n):
        placed.append((rng.choice(colors), shape, 1, cells.take()))
    others = [s for s in shapes if s != shape]
    for _ in range(rng.randint(max(1, 3 - n), 3)):
        placed.append((rng.choice(colors), rng.choice(others), 0, cells.take()))
    return f"How many {PLURALS[shape]} are there?", str(n)


def _position(rng: random.Random, cells: _Cells, placed: Placed, k: int) -> tuple[str, str]:
    a = (rng.choice(tuple(COLORS)), rng.choice(SHAPES))
    b = _other_pair(rng, {a})
    answer = rng.choice(RELATIONS)
    r0, c0 = cells.take()
    if answer in ("left", "right"):  # same row, different columns
        rb, cb = cells.take(lambda rc: rc[0] == r0 and rc[1] != c0)
        if (c0 < cb) != (answer == "left"):
            (r0, c0), (rb, cb) = (rb, cb), (r0, c0)
    else:  # same column, different rows; "above" means a smaller row index
        rb, cb = cells.take(lambda rc: rc[1] == c0 and rc[0] != r0)
        if (r0 < rb) != (answer == "above"):
            (r0, c0), (rb, cb) = (rb, cb), (r0, c0)
    placed.append((*a, 1, (r0, c0)))
    placed.append((*b, 2, (rb, cb)))
    for _ in range(rng.randint(1, 4)):
        placed.append((*_other_pair(rng, {a, b}), 0, cells.take()))
    return f"Where is the {a[0]} {a[1]} relative to the {b[0]} {b[1]}?", answer


def _read(rng: random.Random, cells: _Cells, placed: Placed, k: int) -> tuple[str, str]:
    answer = rng.choice(READ_ANSWERS)
    for _ in range(rng.randint(2, 5)):
        placed.append((rng.choice(tuple(COLORS)), rng.choice(SHAPES), 0, cells.take()))
    return "What is written on the label?", answer


_CONTENT = {"exist": _exist, "color": _color, "count": _count, "position": _position, "read": _read}


def _compose(rng: random.Random, task: str, k: int) -> tuple[Scene, str, str]:
    """Choose the scene content, the question and the answer for one sample (`k`: index of
    the sample among those of its task, used to alternate yes/no)."""
    cells = _Cells(rng)
    placed: Placed = []
    if task not in _CONTENT:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    question, answer = _CONTENT[task](rng, cells, placed, k)
    scene = Scene()
    scene.label = answer if task == "read" else rng.choice(READ_ANSWERS)
    for color, shape, role, (r, c) in placed:
        size = rng.randint(15, 19)
        cx = c * CELL + CELL / 2 + rng.uniform(-2, 2)
        cy = r * CELL + CELL / 2 + rng.uniform(-2, 2)
        scene.objects.append(Obj("shape", shape, color, cx, cy, size, role))
    # the label goes in a free cell; its characters are objects of kind "char"
    r, c = cells.take()
    scene.objects.append(Obj("label", scene.label, None, c * CELL + CELL / 2, r * CELL + CELL / 2, 22))
    return scene, question, answer


def _draw_shape(draw: ImageDraw.ImageDraw, o: Obj) -> None:
    h = o.size / 2
    x0, y0, x1, y1 = o.cx - h, o.cy - h, o.cx + h, o.cy + h
    fill = COLORS[o.color]
    if o.name == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif o.name == "square":
        s = h * 0.85
        draw.rectangle((o.cx - s, o.cy - s, o.cx + s, o.cy + s), fill=fill)
    elif o.name == "triangle":
        draw.polygon([(o.cx, y0), (x0, y1), (x1, y1)], fill=fill)
    elif o.name == "cross":
        t = o.size / 6
        draw.rectangle((x0, o.cy - t, x1, o.cy + t), fill=fill)
        draw.rectangle((o.cx - t, y0, o.cx + t, y1), fill=fill)
    else:
        raise ValueError(f"unknown shape {o.name!r}")


def _render(rng: random.Random, scene: Scene, read: bool) -> Image.Image:
    nprng = np.random.default_rng(rng.getrandbits(32))
    base = nprng.integers(170, 215)
    arr = base + nprng.normal(0.0, 8.0, size=(IMAGE_SIZE, IMAGE_SIZE, 1)) + nprng.normal(0.0, 4.0, size=(1, 1, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    # clutter: small specks in the objects' colours, too small to count as shapes
    for _ in range(rng.randint(6, 12)):
        x, y, s = rng.uniform(0, IMAGE_SIZE - 3), rng.uniform(0, IMAGE_SIZE - 3), rng.choice((2, 3))
        draw.rectangle((x, y, x + s - 1, y + s - 1), fill=COLORS[rng.choice(tuple(COLORS))])
    font = _font()
    chars: list[Obj] = []
    for o in scene.objects:
        if o.kind == "shape":
            _draw_shape(draw, o)
            continue
        # the label: white box, black letters drawn one by one so each has a known centre
        draw.rectangle((o.cx - 11, o.cy - 8, o.cx + 10, o.cy + 7), fill=(255, 255, 255))
        x = o.cx - 9
        for i, ch in enumerate(o.name):
            left, top, right, bottom = font.getbbox(ch)
            y = o.cy - (top + bottom) / 2
            draw.text((x - left, y), ch, fill=(0, 0, 0), font=font)
            role = (i + 1) if read else 0
            chars.append(Obj("char", ch, None, x + (right - left) / 2, o.cy, right - left, role))
            x += right - left + 2
    scene.objects.extend(chars)
    return img


def make_sample(split: str, seed: int | None, index: int, task: str, task_index: int | None = None) -> tuple[dict, Scene]:
    """Sample ``index`` of (split, seed) for ``task``, with the scene it was drawn from
    (objects, their centres in pixels and their role in the question). ``task_index``
    (default ``index``) is the sample's rank among its task's samples; `exist` answers
    yes on even ranks and no on odd ones."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
    seed = DEFAULT_SEEDS[split] if seed is None else int(seed)
    rng = _rng(split, seed, index)
    scene, question, answer = _compose(rng, task, index if task_index is None else task_index)
    image = _render(rng, scene, read=task == "read")
    return {"image": image, "question": question, "answers": [answer], "task": task}, scene


def _iter(split: str, seed: int | None, tasks: tuple[str, ...], with_scene: bool):
    i = 0
    while True:
        sample, scene = make_sample(split, seed, i, tasks[i % len(tasks)], i // len(tasks))
        yield (sample, scene) if with_scene else sample
        i += 1


def make_samples(split: str, n: int, seed: int | None = None, tasks=None) -> list[dict]:
    """``n`` samples of ``split``, tasks in round-robin order (balanced). Each is a dict with
    ``image`` (PIL RGB, 96 x 96), ``question``, ``answers`` (list of str) and ``task``.
    ``seed=None`` takes the split's default seed (train 0, val 1, test 2)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return list(islice(_iter(split, seed, _check_tasks(tasks), False), n))


def make_scenes(split: str, n: int, seed: int | None = None, tasks=None) -> list[tuple[dict, Scene]]:
    """Like :func:`make_samples`, with each sample's :class:`Scene` (for tests and training)."""
    return list(islice(_iter(split, seed, _check_tasks(tasks), True), n))


def train_stream(seed: int = 0, tasks=None, with_scene: bool = False) -> Iterator:
    """Endless stream of `train` samples (round-robin over tasks); with ``with_scene`` it
    yields ``(sample, scene)`` pairs."""
    return _iter("train", seed, _check_tasks(tasks), with_scene)


def export(split: str, n: int, seed: int | None, out_dir) -> Path:
    """Write ``n`` samples as ``out_dir/data.jsonl`` (``image`` relative path, ``question``,
    ``answers``, ``task``) and ``out_dir/images/*.png``. Everything is written to a temporary
    folder beside ``out_dir`` and renamed into place, so nothing is ever half-written.
    ``out_dir`` must not exist or be empty."""
    out = Path(out_dir)
    with folder_written_whole(out) as tmp:  # refuses a non-empty out_dir before any work
        samples = make_samples(split, n, seed)
        (tmp / "images").mkdir()
        width = max(5, len(str(max(n - 1, 0))))
        with open(tmp / "data.jsonl", "w", encoding="utf-8") as f:
            for i, s in enumerate(samples):
                rel = f"images/{split}_{i:0{width}d}.png"
                s["image"].save(tmp / rel)
                row = {"image": rel, "question": s["question"], "answers": s["answers"], "task": s["task"]}
                f.write(json.dumps(row) + "\n")
    return out
