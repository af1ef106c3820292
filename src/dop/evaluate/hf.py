"""Hugging Face ``datasets`` as evaluation data (docs/eval.md, "Hugging Face datasets").

A spec is one of

- a folder written by ``Dataset.save_to_disk`` (for a ``DatasetDict`` folder, the split's
  subfolder, or the folder itself when it holds one split);
- a ``.parquet`` file, a glob of them, or a folder holding ``*.parquet`` (and no
  ``data.jsonl``): what ``dop data export shapes --format hf`` writes;
- ``hf:OWNER/NAME:SPLIT`` or ``hf:OWNER/NAME:CONFIG:SPLIT``: a data set on the hub (needs
  the network; offline it fails with one line saying so). For a data set with several
  configs, ``hf:OWNER/NAME:CONFIG`` takes the config's only split.

Columns are found by name (:data:`DEFAULT_COLUMNS`, first match wins): the image
(``image`` or ``images``, a list of which must hold one image), the question, the
answers (a string, a list of strings, VQAv2's list of ``{"answer": ...}`` records, or the
index of the right option), an optional task column, an optional hint (prepended to the
question, as MMBench and ScienceQA prompts do) and optional options (a list column such
as ``choices`` or ``options``, or MMBench's letter columns ``A``..``E``). With options the
question lists them as ``A. ...`` lines followed by :data:`OPTIONS_INSTRUCTION`, and the
reference answer becomes the option's letter. ``columns`` (``--columns``) overrides any
role: ``{"question": "query", "options": "A+B+C+D", "task": "category"}``.

Everything except decoding the images is checked up front, and each image's header is
read, so a bad row fails at once with one line naming the row and the column.
"""

from __future__ import annotations

import glob
import io
import os
from typing import Any, Mapping, Sequence

from PIL import Image, UnidentifiedImageError

from .samples import DEFAULT_TASK, DatasetError, Sample, check_known_tasks

HF_PREFIX = "hf:"
ROLES = ("image", "question", "answers", "task", "hint", "options")
DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "image": ("image", "images", "img"),
    "question": ("question", "query", "prompt"),
    "answers": ("answers", "answer", "label"),
    "task": ("task",),
    "hint": ("hint",),
    "options": ("options", "choices"),
}
LETTER_COLUMNS = tuple("ABCDEFGH")
# LLaVA-1.5's multiple-choice instruction (MMBench, ScienceQA)
OPTIONS_INSTRUCTION = "Answer with the option's letter from the given choices directly."
INSTALL_HINT = "pip install 'dop[hf]' (or the lmms extra)"


def is_hf_spec(spec: str) -> bool:
    """Whether ``spec`` names data this module reads (see the module docstring)."""
    spec = str(spec)
    if spec.startswith(HF_PREFIX):
        return True
    if spec.endswith(".parquet"):
        return True  # a file or a glob; a missing one fails with its own message
    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, "data.jsonl")):
            return False
        return _is_saved_folder(spec) or bool(_parquet_files(spec))
    return False


def parse_columns(text: str | None) -> dict[str, str]:
    """``"question=query,options=A+B+C"`` -> ``{"question": "query", "options": "A+B+C"}``."""
    out: dict[str, str] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        role, sep, name = item.partition("=")
        role, name = role.strip(), name.strip()
        if not sep or not name:
            raise DatasetError(f"--columns: expected ROLE=COLUMN, got {item!r}")
        if role not in ROLES:
            raise DatasetError(f"--columns: unknown role {role!r}; roles: {', '.join(ROLES)}")
        out[role] = name
    return out


def load_hf(spec: str, limit: int | None = None, tasks: Sequence[str] | None = None,
            columns: Mapping[str, str] | None = None) -> list[Sample]:
    """Read and check the data set named by ``spec`` (see the module docstring)."""
    ds, name = _open(str(spec))
    if len(ds) == 0:
        raise DatasetError(f"{name}: the split is empty (0 rows)")
    cols = _map_columns(ds.column_names, dict(columns or {}), name)
    rows = range(len(ds))
    if tasks is not None:
        if cols["task"] is None:
            present = [DEFAULT_TASK]
            task_of = [DEFAULT_TASK] * len(ds)
        else:
            task_of = [str(t) for t in ds[cols["task"]]]
            present = list(dict.fromkeys(task_of))
        check_known_tasks(tasks, present, name)
        keep = set(tasks)
        rows = [i for i in rows if task_of[i] in keep]
    rows = list(rows)[: limit] if limit is not None else list(rows)
    if not rows:
        raise DatasetError(f"{name}: no rows left after the task filter")
    wanted = sorted({c for role, c in cols.items() if c and role != "options"} | set(_option_columns(cols)))
    table = ds.select_columns(wanted).select(rows).with_format("arrow")[:]
    records = table.to_pylist()
    root = os.path.dirname(os.path.abspath(name)) if not name.startswith(HF_PREFIX) else None
    return [_to_sample(r, i, cols, name, root) for i, r in zip(rows, records)]


# ----------------------------------------------------------------------------- opening
def require_datasets():
    """The ``datasets`` package, or a :class:`DatasetError` saying how to install it."""
    try:
        import datasets  # heavy: optional (the hf extra), and slow to import
    except ImportError:
        raise DatasetError(
            f"reading Hugging Face datasets needs the 'datasets' package; {INSTALL_HINT}"
        ) from None
    return datasets


def _is_saved_folder(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _parquet_files(spec: str) -> list[str]:
    if os.path.isdir(spec):
        return sorted(glob.glob(os.path.join(spec, "*.parquet")))
    return sorted(glob.glob(spec))


def _open(spec: str):
    """``(Dataset, display name)``, without ``datasets``' progress bars."""
    datasets = require_datasets()
    was_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return _open_quietly(spec)
    finally:
        if was_on:
            datasets.enable_progress_bars()


def _open_quietly(spec: str):
    if spec.startswith(HF_PREFIX):
        return _open_hub(spec), spec
    datasets = require_datasets()
    if os.path.isdir(spec) and _is_saved_folder(spec):
        try:
            ds = datasets.load_from_disk(spec)
        except Exception as e:  # corrupt or foreign folder
            raise DatasetError(f"{spec}: cannot read the saved data set ({type(e).__name__}: {e})") from None
        if isinstance(ds, datasets.DatasetDict):
            splits = list(ds)
            if len(splits) != 1:
                raise DatasetError(
                    f"{spec} holds the splits {', '.join(splits)}; pass one split's folder, "
                    f"e.g. {os.path.join(spec, splits[0])}"
                )
            ds = ds[splits[0]]
        return ds, spec
    files = _parquet_files(spec)
    if not files:
        raise DatasetError(f"data set file {spec!r} not found (no parquet file matches)")
    import pyarrow.parquet as pq  # heavy: optional (the hf extra), Hugging Face data sets only

    try:
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    except Exception as e:
        raise DatasetError(f"{spec}: cannot read parquet ({type(e).__name__}: {e})") from None
    if rows == 0:
        raise DatasetError(f"{spec}: the split is empty (0 rows)")
    try:
        ds = datasets.Dataset.from_parquet(files if len(files) > 1 else files[0], keep_in_memory=True)
    except Exception as e:
        raise DatasetError(f"{spec}: cannot read parquet ({type(e).__name__}: {e})") from None
    return ds, spec


def _open_hub(spec: str):
    parts = spec[len(HF_PREFIX):].split(":")
    if len(parts) not in (2, 3) or "/" not in parts[0] or not all(parts):
        raise DatasetError(
            f"{spec!r}: expected hf:OWNER/NAME:SPLIT or hf:OWNER/NAME:CONFIG:SPLIT "
            f"(e.g. hf:lmms-lab/GQA:testdev_balanced_instructions:testdev)"
        )
    repo, split = parts[0], parts[-1]
    config = parts[1] if len(parts) == 3 else None
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("", "0"):
        raise DatasetError(
            f"{spec}: hub data sets need the network, and HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set; "
            f"save the data set with save_to_disk (or as parquet) where you have the network and pass that folder"
        )
    datasets = require_datasets()
    try:
        try:
            return datasets.load_dataset(repo, config, split=split)
        except ValueError as e:
            if config is not None or "config name is missing" not in str(e).lower():
                raise
        # hf:OWNER/NAME:CONFIG of a data set with several configs: the config's only split
        parts_of = datasets.load_dataset(repo, split)
        if len(parts_of) != 1:
            raise DatasetError(
                f"{spec}: config {split!r} has the splits {', '.join(parts_of)}; "
                f"use hf:{repo}:{split}:SPLIT"
            )
        return next(iter(parts_of.values()))
    except DatasetError:
        raise
    except Exception as e:
        text = f"{type(e).__name__}: {e}".splitlines()[0]
        raise DatasetError(
            f"{spec}: cannot load from the hub ({text}); offline, save the data set with save_to_disk "
            f"(or as parquet) where you have the network and pass that folder"
        ) from None


# ----------------------------------------------------------------------------- columns
def _option_columns(cols: Mapping[str, Any]) -> list[str]:
    opt = cols.get("options")
    if not opt:
        return []
    return opt.split("+")


def _map_columns(present: Sequence[str], override: dict[str, str], name: str) -> dict[str, str | None]:
    cols: dict[str, str | None] = {}
    for role in ROLES:
        if role in override:
            for c in override[role].split("+") if role == "options" else [override[role]]:
                if c not in present:
                    raise DatasetError(
                        f"{name}: --columns {role}={override[role]}: no column {c!r} (columns: {', '.join(present)})"
                    )
            cols[role] = override[role]
            continue
        found = next((c for c in DEFAULT_COLUMNS[role] if c in present), None)
        if found is None and role == "options":
            letters = [c for c in LETTER_COLUMNS if c in present]
            found = "+".join(letters) if len(letters) >= 2 else None
        if found is None and role in ("image", "question", "answers"):
            raise DatasetError(
                f"{name}: no {role} column (looked for {', '.join(DEFAULT_COLUMNS[role])}; columns: "
                f"{', '.join(present)}); name it with --columns {role}=COLUMN"
            )
        cols[role] = found
    return cols


def _to_sample(row: dict, index: int, cols: Mapping[str, str | None], name: str, root: str | None) -> Sample:
    where = f"{name} row {index}"

    def bad(col: str, what: str) -> DatasetError:
        return DatasetError(f"{where}, column {col!r}: {what}")

    qcol, acol = cols["question"], cols["answers"]
    question = row[qcol]
    if not isinstance(question, str):
        raise bad(qcol, f"expected a string question, got {_show(question)}")
    if cols["hint"] and isinstance(row.get(cols["hint"]), str) and row[cols["hint"]].strip():
        question = f"{row[cols['hint']].strip()}\n{question}"
    task = DEFAULT_TASK
    if cols["task"]:
        task = row[cols["task"]]
        if not isinstance(task, (str, int)) or isinstance(task, bool) or task == "":
            raise bad(cols["task"], f"expected a non-empty task name, got {_show(task)}")
        task = str(task)
    options = _options(row, cols, bad)
    answers = _answers(row[acol], options, lambda what: bad(acol, what))
    if options:
        lines = [f"{chr(65 + k)}. {o}" for k, o in enumerate(options)]
        question = "\n".join([question, *lines, OPTIONS_INSTRUCTION])
    icol = cols["image"]
    data, path = _image_source(row[icol], lambda what: bad(icol, what), root)
    sample = Sample(question=question, answers=answers, task=task, image_path=path, where=where)
    sample.image_bytes, sample.image_column = data, icol
    _check_header(sample)
    return sample


def _show(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 60 else text[:57] + "..."


def _options(row: dict, cols, bad) -> list[str]:
    spec = cols["options"]
    if not spec:
        return []
    names = spec.split("+")
    if len(names) == 1:
        value = row[names[0]]
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(o, (str, int, float)) for o in value):
            raise bad(names[0], f"expected a list of option strings, got {_show(value)}")
        return [str(o) for o in value]
    out = []
    for c in names:  # letter columns: stop at the first empty one (MMBench has 2-4 options)
        v = row[c]
        if v is None or (isinstance(v, float) and v != v) or (isinstance(v, str) and not v.strip()):
            break
        out.append(str(v))
    return out


def _answers(value: Any, options: list[str], bad) -> list[str]:
    if isinstance(value, bool) or value is None:
        raise bad(f"expected an answer (string, number or list), got {_show(value)}")
    if isinstance(value, list):
        items = [v.get("answer") if isinstance(v, dict) else v for v in value]
        if not items or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in items):
            raise bad(f"expected a non-empty list of answers, got {_show(value)}")
        answers = [str(v) for v in items]
    elif isinstance(value, (str, int, float)):
        answers = [str(value)]
    else:
        raise bad(f"expected an answer (string, number or list), got {_show(value)}")
    if not options:
        return answers
    # multiple choice: the reference becomes the option's letter
    letters = [chr(65 + k) for k in range(len(options))]
    a = answers[0].strip()
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(options):
        return [letters[value]]
    if a.upper() in letters:
        return [a.upper()]
    if a in options:
        return [letters[options.index(a)]]
    raise bad(f"answer {_show(value)} is neither an option's index, its letter nor its text "
              f"(options: {_show(options)})")


def _image_source(value: Any, bad, root: str | None) -> tuple[bytes | None, str | None]:
    """``(bytes, path)`` of a cell: an Image feature's ``{"bytes", "path"}``, raw bytes, a
    path string, or a list of one of those."""
    if isinstance(value, list):
        if len(value) != 1:
            raise bad(f"holds {len(value)} images; dop evaluates one image per question")
        value = value[0]
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data:
            return bytes(data), None
        value = path
    if isinstance(value, (bytes, bytearray)):
        if not value:
            raise bad("empty image bytes")
        return bytes(value), None
    if isinstance(value, str) and value:
        full = value if os.path.isabs(value) or root is None else os.path.join(root, value)
        if not os.path.isfile(full):
            raise bad(f"image file {value!r} not found")
        return None, full
    raise bad(f"not an image (expected an image, image bytes or a path, got {_show(value)})")


def _check_header(sample: Sample) -> None:
    """Read the image header only (no decoding), so that a cell that is not an image fails now."""
    try:
        src = io.BytesIO(sample.image_bytes) if sample.image_bytes is not None else sample.image_path
        with Image.open(src):
            pass
    except (UnidentifiedImageError, OSError) as e:
        raise DatasetError(f"{sample.where}, column {sample.image_column!r}: not an image ({e})") from None


# ----------------------------------------------------------------------------- export
def export_parquet(samples: Sequence[dict], path) -> None:
    """Write samples (dicts with a PIL ``image``, ``question``, ``answers``, ``task``) as one
    parquet file with the images embedded (PNG bytes) and the ``datasets`` features in its
    schema, so ``datasets``, lmms-eval and :func:`load_hf` decode the images."""
    datasets = require_datasets()
    features = datasets.Features({
        "id": datasets.Value("int64"),
        "image": datasets.Image(),
        "question": datasets.Value("string"),
        "answers": datasets.List(datasets.Value("string")),
        "answer": datasets.Value("string"),
        "task": datasets.Value("string"),
    })
    ds = datasets.Dataset.from_dict({
        "id": list(range(len(samples))),
        "image": [s["image"] for s in samples],
        "question": [s["question"] for s in samples],
        "answers": [list(s["answers"]) for s in samples],
        "answer": [s["answers"][0] for s in samples],
        "task": [s["task"] for s in samples],
    }, features=features)
    datasets.disable_progress_bars()
    try:
        ds.to_parquet(str(path))
    finally:
        datasets.enable_progress_bars()
