"""`dop transfer`: rescale a policy's depths for a model with another number of decoder layers.

    dop transfer policy.json --num-layers 40 -o policy-40.json

Depths become ``d * L_new / L_old`` rounded half up, and at least 1 where the source's
was (``dop.policy.transfer_depth``): an operation the source kept is never erased. A warning
names distinct depths that collapse into one. A new layer is skipped (per-layer skips,
``dop-policy/2``) where the source layer holding its midpoint was (``dop.policy.transfer_layer``).
Groups, ranker and meta are kept (``meta.transferred_from_layers`` records the original
depth). Without ``-o`` the policy is printed.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from ..outputs import check_output_file, output_lock
from ..policy import Policy, TransferWarning
from . import COMMANDS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "transfer",
        help=COMMANDS["transfer"],
        description="Rescale every depth of a policy file (dop-policy/1 or /2) by d * L_new / L_old, rounded half "
                    "up and at least 1 where the source's depth was (an operation the source kept is never erased); "
                    "a new layer is skipped (per-layer skips, dop-policy/2) where the source layer holding its "
                    "midpoint was.",
    )
    p.add_argument("policy", metavar="policy.json", help="the policy file")
    p.add_argument("--num-layers", type=int, required=True, metavar="L", help="decoder layers of the target model")
    p.add_argument("-o", "--output", metavar="out.json", help="write here (default: print)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.num_layers < 1:
        raise ValueError(f"--num-layers must be a positive integer, got {args.num_layers}")
    if args.output:
        check_output_file("-o", args.output)
    policy = Policy.from_json(args.policy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TransferWarning)
        out = policy.transfer(args.num_layers)
    for w in caught:
        print(f"dop: warning: {w.message}", file=sys.stderr)
    with output_lock([args.output]):
        text = out.to_json(args.output)
    if args.output:
        print(f"{args.policy}: {policy.num_layers} -> {out.num_layers} layers, {out.describe()}; wrote {args.output}",
              file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
