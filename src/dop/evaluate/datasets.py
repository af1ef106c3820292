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

Everything is checked before the first sample is run (lines parse, fields have the right
types, no answer is blank, every image file exists and its header is
readable with at most :func:`max_image_pixels` pixels), so a bad file fails at once and
names the line; the pixels themselves are decoded lazily.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from PIL import UnidentifiedImageError

from ..demo import shapes
from . import hf
from .samples import (  # noqa: F401  (re-exported: dop.evaluate.datasets is where users find them)
    DEFAULT_TASK,
    DatasetError,
    Sample,
    check_known_tasks,
    max_image_pixels,
    open_image,
    set_max_image_pixels,
)

DATASETS = ("shapes",)
MAX_LINE_BYTES = 1 << 20  # one sample's JSON line; a longer one is not a sample
DEFAULT_SHAPES_SAMPLES = 300


def _check_answers(answers: list, where: str) -> list[str]:
    out = [str(a) for a in answers]
    if any(not a.strip() for a in out):
        raise DatasetError(
            f"{where}: 'answers' holds a blank answer ({out!r}); no prediction could ever match it "
            f"fairly; remove it or give the real answer"
        )
    return out


def as_sample(obj: Any, index: int = 0) -> Sample:
    """A :class:`Sample` from a Sample or a dict with ``image`` (PIL image or path),
    ``question``, ``answers`` and optionally ``task``."""
    if isinstance(obj, Sample):
        return obj
    if not isinstance(obj, dict):
        raise DatasetError(f"sample #{index}: expected a dict or Sample, got {type(obj).__name__}")
    where = f"sample #{index}"
    for key in ("image", "question", "answers"):
        if key not in obj:
            raise DatasetError(f"{where}: missing field {key!r} (need image, question, answers; task optional)")
    answers = obj["answers"]
    if isinstance(answers, (str, bytes)) or not isinstance(answers, (list, tuple)) or not answers:
        raise DatasetError(f"{where}: 'answers' must be a non-empty list of strings, got {answers!r}")
    image = obj.get("image")
    path = os.fspath(image) if isinstance(image, (str, os.PathLike)) else None
    return Sample(
        question=str(obj["question"]),
        answers=_check_answers(list(answers), where),
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
        check_known_tasks(tasks, shapes.TASKS, "shapes")
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
    with open(path, "rb") as fh:
        # readline with a cap: a huge line is refused without being read whole
        for lineno, raw in enumerate(iter(lambda: fh.readline(MAX_LINE_BYTES + 1), b""), start=1):
            where = f"{path} line {lineno}"
            if len(raw) > MAX_LINE_BYTES:
                raise DatasetError(f"{where}: line longer than any sample needs (limit {MAX_LINE_BYTES} bytes)")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DatasetError(f"{where}: not UTF-8 text (byte {e.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise DatasetError(f"{where}: JSON nested too deeply") from None
            samples.append(_row_to_sample(row, root, where))
    if tasks is not None:
        present = list(dict.fromkeys(s.task for s in samples))
        check_known_tasks(tasks, present, str(path))
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
    answers = _check_answers(answers, where)
    if "\0" in image:
        raise DatasetError(f"{where}: 'image' holds a NUL character")
    resolved = Path(image) if os.path.isabs(image) else root / image
    if not resolved.is_file():
        raise DatasetError(f"{where}: image file {image!r} not found (looked for {str(resolved)!r})")
    _check_image_header(str(resolved), where)
    return Sample(
        question=question,
        answers=answers,
        task=task,
        image_path=str(resolved),
        where=where,
    )


def _check_image_header(path: str, where: str) -> None:
    """Open the header only: the format is readable and the pixel count within the limit."""
    try:
        open_image(path, where).close()
    except (UnidentifiedImageError, OSError) as e:
        raise DatasetError(f"{where}: cannot read image {path!r} ({e})") from None
