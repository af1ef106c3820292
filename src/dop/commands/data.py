"""`dop data export shapes --split test --n 300 --seed S --out DIR`: write a synthetic data
set in the JSONL + PNG layout that user data sets use."""

from __future__ import annotations

import os

DATASETS = ("shapes",)


def _export(args) -> int:
    if args.dataset not in DATASETS:
        raise ValueError(f"unknown data set {args.dataset!r}; known data sets: {', '.join(DATASETS)}")
    from dop.demo import shapes

    if args.split not in shapes.SPLITS:
        raise ValueError(f"unknown split {args.split!r}; known splits: {', '.join(shapes.SPLITS)}")
    if args.n <= 0:
        raise ValueError(f"--n must be positive, got {args.n}")
    from dop.outputs import check_output_dir, output_lock

    check_output_dir("--out", args.out, must_be_empty=True)
    parent = os.path.dirname(os.path.abspath(args.out))
    with output_lock([os.path.join(parent, os.path.basename(os.path.abspath(args.out)) + ".export")]):
        out = shapes.export(args.split, args.n, args.seed, args.out)
    print(f"wrote {args.n} samples to {out / 'data.jsonl'} (images in {out / 'images'})")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="synthetic benchmark data", description=__doc__)
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    exp = sub.add_parser("export", help="write a data set as data.jsonl + images/")
    exp.add_argument("dataset", help=f"data set name ({', '.join(DATASETS)})")
    exp.add_argument("--split", default="test", help="train, val or test (default test)")
    exp.add_argument("--n", type=int, default=300, help="number of samples, round-robin over tasks (default 300)")
    exp.add_argument("--seed", type=int, default=None, help="seed (default: the split's own)")
    exp.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    exp.set_defaults(func=_export)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
