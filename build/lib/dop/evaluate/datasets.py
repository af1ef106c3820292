"""Evaluation data sets: the bundled synthetic benchmark or a user's JSONL file.

A data set spec is one of

- ``shapes:SPLIT`` or ``shapes:SPLIT:SEED``: the synthetic benchmark of ``dop.demo.shapes``
  (splits ``train``, ``val``, ``test``; without a seed, the split's default seed). The
  sample count is ``limit`` (default :data:`DEFAULT_SHAPES_SAMPLES`).
- a Hugging Face data set: parquet files, a ``save_to_disk`` folder or
  ``hf:OWNER/NAME[:CONFIG]:SPLIT`` (see :mod:`dop.evaluate.hf` for the column mapping).
- ``FILE.jsonl``, or a folder holding ``data.jsonl`` (what ``dop data export`` writes):
  one JSON object per line with ``image`` (a path relative to the JSONL file, or
  absolute), ``question`` (string), ``answers`` (non-empty list of strings; numbers are
  accepted and turned into strings) and ``task`` (string; ``"all"`` when left out).
  Blank lines are skipped. ``limit`` keeps the first samples.

Everything is checked before a single image is opened (lines parse, fields have the right
types, every image file exists), so a bad file fails at once and names the line; the
images themselves are opened lazily.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

DATASETS = ("shapes",)
DEFAULT_SHAPES_SAMPLES = 300
DEFAULT_TASK = "all"


class DatasetError(ValueError):
    """A data set spec or file is unusable; the message names the line or value."""


@dataclass
class Sample:
    """One question about one image. ``image`` is a PIL image, or None until
    :meth:`load_image` opens ``image_path``; ``where`` says where the sample came from
    (``file.jsonl line 3`` or ``shapes:test #12``) for error messages."""

    question: str
    answers: list[str]
    task: str
    image: Any = None
    image_path: str | None = None
    where: str = ""
    image_bytes: bytes | None = None  # an encoded image (Hugging Face data sets), decoded on first use
    image_column: str = "image"

    def load_image(self):
        """The image as PIL RGB (opened from ``image_bytes`` or ``image_path`` on first use)."""
        if self.image is None and self.image_bytes is not None:
            import io

            from PIL import Image, UnidentifiedImageError

            try:
                with Image.open(io.BytesIO(self.image_bytes)) as im:
                    self.image = im.convert("RGB")
            except (UnidentifiedImageError, OSError) as e:
                raise DatasetError(f"{self.where}, column {self.image_column!r}: not an image ({e})") from None
        elif self.image is None:
            from PIL import Image, UnidentifiedImageError

            try:
                with Image.open(self.image_path) as im:
                    self.image = im.convert("RGB")
            except FileNotFoundError:
                raise DatasetError(f"{self.where}: image file {self.image_path!r} not found") from None
            except (UnidentifiedImageError, OSError) as e:
                raise DatasetError(f"{self.where}: cannot read image {self.image_path!r} ({e})") from None
        elif getattr(self.image, "mode", "RGB") != "RGB":
            self.image = self.image.convert("RGB")
        return self.image


def as_sample(obj: Any, index: int = 0) -> Sample:
    """A :class:`Sample` from a Sample or a dict with ``image`` (PIL image or path),
    ``question``, ``answers`` and optionally ``task``."""
    if isinstance(obj, Sample):
        return obj
    if not isinstance(obj, dict):
        raise DatasetError(f"sample #{index}: expected a dict or Sample, got {type(obj).__name__}")
    image = obj.get("image")
    path = os.fspath(image) if isinstance(image, (str, os.PathLike)) else None
    return Sample(
        question=str(obj["question"]),
        answers=[str(a) for a in obj["answers"]],
        task=str(obj.get("task", DEFAULT_TASK)),
        image=None if path else image,
        image_path=path,
        where=f"sample #{index}",
    )


def load_dataset(spec: str, limit: int | None = None, tasks: Sequence[str] | None = None,
                 columns: dict[str, str] | str | None = None) -> list[Sample]:
    """Load the data set named by ``spec`` (see the module docstring).

    ``tasks`` keeps only those tasks (an unknown one is an error listing the known ones);
    ``limit`` caps the number of samples; ``columns`` (a dict or ``"role=column,..."``)
    names the columns of a Hugging Face data set (:mod:`dop.evaluate.hf`). Raises
    :class:`DatasetError` (a ``ValueError``) with a message naming the offending spec, line
    or task.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DatasetError(f"limit must be a positive integer, got {limit!r}")
    spec = str(spec)
    head, _, rest = spec.partition(":")
    from . import hf

    if isinstance(columns, str):
        columns = hf.parse_columns(columns)
    if columns and not hf.is_hf_spec(spec):
        raise DatasetError(f"--columns applies to Hugging Face data sets (parquet, save_to_disk, hf:), not {spec!r}")
    if head in DATASETS and rest:
        samples = _load_shapes(rest, limit, tasks)
    elif hf.is_hf_spec(spec):
        samples = hf.load_hf(spec, limit=limit, tasks=tasks, columns=columns)
    elif os.path.isdir(spec) or spec.endswith(".jsonl") or os.path.isfile(spec):
        samples = load_jsonl(spec, limit=limit, tasks=tasks)
    else:
        raise DatasetError(
            f"unknown data set {spec!r}; known data sets: shapes:SPLIT[:SEED] "
            f"(splits train, val, test), a path to a JSONL file (or a folder holding data.jsonl), "
            f"parquet files, a save_to_disk folder, or hf:OWNER/NAME[:CONFIG]:SPLIT"
        )
    if not samples:
        raise DatasetError(f"data set {spec!r} has no samples")
    return samples


def _load_shapes(rest: str, limit: int | None, tasks: Sequence[str] | None) -> list[Sample]:
    from dop.demo import shapes

    parts = rest.split(":")
    split = parts[0]
    if split not in shapes.SPLITS or len(parts) > 2:
        raise DatasetError(
            f"unknown shapes split {rest!r}; use shapes:SPLIT or shapes:SPLIT:SEED with SPLIT "
            f"one of {', '.join(shapes.SPLITS)}"
        )
    seed = None
    if len(parts) == 2:
        try:
            seed = int(parts[1])
        except ValueError:
            raise DatasetError(f"shapes:{rest}: the seed must be an integer, got {parts[1]!r}") from None
    if tasks is not None:
        _check_known(tasks, shapes.TASKS, "shapes")
    n = DEFAULT_SHAPES_SAMPLES if limit is None else limit
    raw = shapes.make_samples(split, n, seed=seed, tasks=list(tasks) if tasks else None)
    name = f"shapes:{rest}"
    return [
        Sample(
            question=s["question"],
            answers=list(s["answers"]),
            task=s["task"],
            image=s["image"],
            where=f"{name} #{i}",
        )
        for i, s in enumerate(raw)
    ]


def _check_known(tasks: Iterable[str], known: Sequence[str], where: str) -> None:
    bad = [t for t in tasks if t not in known]
    if bad:
        raise DatasetError(
            f"unknown task(s) {', '.join(map(repr, bad))} for {where}; known tasks: {', '.join(known)}"
        )


def load_jsonl(path: str | os.PathLike, limit: int | None = None, tasks: Sequence[str] | None = None) -> list[Sample]:
    """Read and check a JSONL data set (or a folder holding ``data.jsonl``)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "data.jsonl").is_file():
            raise DatasetError(
                f"data set folder {str(path)!r} holds no data.jsonl, parquet files or save_to_disk data set"
            )
        path = path / "data.jsonl"
    if not path.is_file():
        raise DatasetError(f"data set file {str(path)!r} not found")
    root = path.parent
    samples: list[Sample] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            samples.append(_row_to_sample(row, root, where))
    if tasks is not None:
        present = list(dict.fromkeys(s.task for s in samples))
        _check_known(tasks, present, str(path))
        keep = set(tasks)
        samples = [s for s in samples if s.task in keep]
    if limit is not None:
        samples = samples[:limit]
    if not samples:
        raise DatasetError(f"data set {str(path)!r} has no samples")
    return samples


def _row_to_sample(row: Any, root: Path, where: str) -> Sample:
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("image", "question", "answers"):
        if key not in row:
            raise DatasetError(f"{where}: missing field {key!r} (need image, question, answers; task optional)")
    image, question, answers = row["image"], row["question"], row["answers"]
    task = row.get("task", DEFAULT_TASK)
    if not isinstance(image, str) or not image:
        raise DatasetError(f"{where}: 'image' must be a non-empty path string, got {image!r}")
    if not isinstance(question, str):
        raise DatasetError(f"{where}: 'question' must be a string, got {question!r}")
    if not isinstance(task, str) or not task:
        raise DatasetError(f"{where}: 'task' must be a non-empty string, got {task!r}")
    if not isinstance(answers, list) or not answers:
        raise DatasetError(f"{where}: 'answers' must be a non-empty list of strings, got {answers!r}")
    for a in answers:
        if isinstance(a, bool) or not isinstance(a, (str, int, float)):
            raise DatasetError(f"{where}: 'answers' must hold strings, got {a!r}")
    resolved = Path(image) if os.path.isabs(image) else root / image
    if not resolved.is_file():
        raise DatasetError(f"{where}: image file {image!r} not found (looked for {str(resolved)!r})")
    return Sample(
        question=question,
        answers=[str(a) for a in answers],
        task=task,
        image_path=str(resolved),
        where=where,
    )
