"""`dop transfer`: rescale a policy's depths for a model with another number of decoder layers.

    dop transfer policy.json --num-layers 40 -o policy-40.json

Depths become ``round(d * L_new / L_old)`` (DESIGN 2.1); groups, ranker and meta are kept
(``meta.transferred_from_layers`` records the original depth). Without ``-o`` the policy is
printed.
"""

from __future__ import annotations

import argparse
import os
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "transfer",
        help="rescale a policy's depths to a model with another layer count",
        description="Rescale every depth of a dop-policy/1 file by round(d * L_new / L_old).",
    )
    p.add_argument("policy", metavar="policy.json", help="the policy file")
    p.add_argument("--num-layers", type=int, required=True, metavar="L", help="decoder layers of the target model")
    p.add_argument("-o", "--output", metavar="out.json", help="write here (default: print)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dop.policy import Policy

    if args.num_layers < 1:
        raise ValueError(f"--num-layers must be a positive integer, got {args.num_layers}")
    if args.output:
        if os.path.isdir(args.output):
            raise ValueError(f"-o {args.output!r} is a folder; give a file name")
        folder = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"-o {args.output!r}: folder {folder!r} does not exist")
    policy = Policy.from_json(args.policy)
    out = policy.transfer(args.num_layers)
    text = out.to_json(args.output)
    if args.output:
        print(f"{args.policy}: {policy.num_layers} -> {out.num_layers} layers, depth {out.depth}; wrote {args.output}",
              file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
