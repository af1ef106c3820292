"""`dop data export shapes --split test --n 300 --seed S --out DIR [--format jsonl|hf]`: write
a synthetic data set in the JSONL + PNG layout that user data sets use, or (``--format hf``)
as one parquet file with the images embedded, plus, for the test split, the lmms-eval task
folder ``shapes_test`` beside it, so that DIR is an lmms-eval ``--include_path``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..demo import shapes
from ..evaluate.hf import export_parquet, require_datasets
from ..lmms import TASKS_DIR
from ..outputs import check_output_dir, folder_written_whole, output_lock
from . import COMMANDS

DATASETS = ("shapes",)
FORMATS = ("jsonl", "hf")
TEMPLATE = "_default_template_shapes_yaml"


def _export(args) -> int:
    if args.dataset not in DATASETS:
        raise ValueError(f"unknown data set {args.dataset!r}; known data sets: {', '.join(DATASETS)}")
    if args.split not in shapes.SPLITS:
        raise ValueError(f"unknown split {args.split!r}; known splits: {', '.join(shapes.SPLITS)}")
    if args.n <= 0:
        raise ValueError(f"--n must be positive, got {args.n}")

    check_output_dir("--out", args.out, must_be_empty=True)
    parent = os.path.dirname(os.path.abspath(args.out))
    with output_lock([os.path.join(parent, os.path.basename(os.path.abspath(args.out)) + ".export")]):
        if args.format == "hf":
            out, parquet = export_hf(args.split, args.n, args.seed, args.out)
            tasks = f"; lmms-eval tasks in {out / 'shapes_test'} (--include_path {out})" if args.split == "test" else ""
            print(f"wrote {args.n} samples to {parquet}{tasks}")
            return 0
        out = shapes.export(args.split, args.n, args.seed, args.out)
    print(f"wrote {args.n} samples to {out / 'data.jsonl'} (images in {out / 'images'})")
    return 0


def export_hf(split: str, n: int, seed: int | None, out_dir) -> tuple[Path, Path]:
    """Write ``out_dir/shapes_<split>.parquet`` (columns ``id``, ``image``, ``question``,
    ``answers``, ``answer``, ``task``) and, for the test split, a copy of the lmms-eval task
    folder ``dop/lmms/tasks/shapes_test`` (whose YAML reads ``shapes_test.parquet`` beside it).
    Written to a temporary folder and renamed into place; ``out_dir`` must not exist or be
    empty. Returns ``(out_dir, parquet path)``."""
    require_datasets()  # a clear line before any work when `datasets` is missing
    out = Path(out_dir)
    name = f"shapes_{split}.parquet"
    with folder_written_whole(out) as tmp:  # refuses a non-empty out_dir before any work
        export_parquet(shapes.make_samples(split, n, seed), tmp / name)
        if split == "test":
            shutil.copytree(TASKS_DIR / "shapes_test", tmp / "shapes_test",
                            ignore=shutil.ignore_patterns("__pycache__", "__init__.py"))
            # the copy names the parquet by its final absolute path: lmms-eval does not resolve
            # the relative one against the YAML folder for the subtasks of a group
            template = tmp / "shapes_test" / TEMPLATE
            text = template.read_text()
            if f"test: {name}\n" not in text:
                raise RuntimeError(f"{template}: no 'test: {name}' line to point at the data")
            template.write_text(text.replace(f"test: {name}\n", f"test: {json.dumps(str(out.resolve() / name))}\n"))
    return out, out / name


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help=COMMANDS["data"], description=__doc__)
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    exp = sub.add_parser("export", help="write a data set as data.jsonl + images/, or as parquet (--format hf)")
    exp.add_argument("dataset", help=f"data set name ({', '.join(DATASETS)})")
    exp.add_argument("--split", default="test", help="train, val or test (default test)")
    exp.add_argument("--n", type=int, default=300, help="number of samples, round-robin over tasks (default 300)")
    exp.add_argument("--seed", type=int, default=None, help="seed (default: the split's own)")
    exp.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    exp.add_argument("--format", choices=FORMATS, default="jsonl",
                     help="jsonl: data.jsonl + images/ (default); hf: shapes_<split>.parquet with the images "
                          "embedded (needs the hf extra), plus the lmms-eval task folder for the test split")
    exp.set_defaults(func=_export)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
