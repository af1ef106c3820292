"""`dop baseline`: write the policy (and ranker) that reproduces a published token pruner.

    dop baseline fastv --model llava-1.5-7b --tokens 64 -o fastv64.json
    dop baseline vispruner --model demo --budget tokens:64 -o vis.json      # = --budget-tokens 64
    dop baseline cdpruner --model demo --budget 0.25 -o cd.json             # dop convention, as in search
    dop baseline pdrop --model llava-1.5-7b --ratio 0.5 --layers 8-16-24 -o pdrop.json
"""

from __future__ import annotations

import argparse
import sys

from ..baselines import BASELINES, baseline
from ..outputs import check_output_file, output_lock
from ..search.cost import BUDGET_HELP, DEFAULT_CONVENTION
from . import COMMANDS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "baseline",
        help=COMMANDS["baseline"],
        description=(
            "Write the dop policy that reproduces a token-pruning method: pruning before the LLM "
            "(vispruner, cdpruner, random, spatial), FastV and DART (all tokens through K layers), "
            "PyramidDrop (stages). Give a kept-token count (--tokens), a FLOPs budget (--budget, in "
            "the grammar and default convention of `dop search`; --budget-tokens N is --budget "
            "tokens:N), or for pdrop its --ratio. FLOPs come from count_flops; no weights are loaded."
        ),
    )
    p.add_argument("method", choices=BASELINES.names())
    p.add_argument("--model", required=True, help="a preset name, 'demo', 'demo-base', a checkpoint folder or a hub id (config only)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--tokens", type=int, help="visual tokens kept per image (FastV/DART: from layer K on)")
    g.add_argument("--budget", metavar="B", help="FLOPs budget: " + BUDGET_HELP.replace("%", "%%"))
    g.add_argument("--budget-tokens", type=int, metavar="N", help="budget of keeping N visual tokens at every layer")
    g.add_argument("--ratio", type=float, help="pdrop: fraction lambda kept at each stage")
    p.add_argument("--convention", choices=("dop", "paper"), default=DEFAULT_CONVENTION,
                   help=f"FLOPs convention of fraction/TFLOPs budgets (default: {DEFAULT_CONVENTION}, as in "
                        "`dop search`; tokens:N budgets are always paper)")
    p.add_argument("--visual-tokens", type=int, help="visual tokens per image (default: the model's typical count)")
    p.add_argument("--text-tokens", type=int, default=64, help="text tokens, for the dop convention (default: 64)")
    p.add_argument("-K", "--K", dest="K", type=int, default=2, help="fastv/dart: layers run on every token (default 2)")
    p.add_argument("--layers", help="pdrop: stage layers, e.g. 8-16-24 (default: the decoder's quarter points)")
    p.add_argument("--important-ratio", type=float, default=0.5, help="vispruner: share of important tokens (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="random: seed (default 0)")
    p.add_argument("-o", "--output", required=True, help="policy JSON file to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    entry = BASELINES.get(args.method)
    if args.ratio is not None and "ratio" not in entry.options:
        takers = [name for name, b in BASELINES.items() if "ratio" in b.options]
        raise ValueError(f"--ratio applies to {' and '.join(takers)} only; give --tokens or --budget")
    if not entry.counts_tokens and args.tokens is not None:
        raise ValueError(f"{args.method} keeps a ratio per stage: give --ratio, --budget or --budget-tokens")
    check_output_file("-o", args.output)
    budget = f"tokens:{args.budget_tokens}" if args.budget_tokens is not None else args.budget
    kw = dict(convention=args.convention, visual_tokens=args.visual_tokens, text_tokens=args.text_tokens,
              budget=budget, **{opt: getattr(args, opt) for opt in entry.options})
    if entry.counts_tokens:
        kw["tokens"] = args.tokens
    policy, spec = baseline(args.method, args.model, **kw)
    with output_lock([args.output]):
        policy.to_json(args.output)
    m = policy.meta
    what = f"{m['kept_tokens']}/{m['visual_tokens']} tokens" if entry.counts_tokens else f"ratio {m['ratio']:g}"
    ff = m["flops_fraction"]
    asked = f"budget {budget} ({m['budget_convention']} convention); " if budget is not None else ""
    print(f"{args.method}: {asked}{what}, ranker {spec}; decoder FLOPs {ff['dop']:.4f} (dop convention) / "
          f"{ff['paper']:.4f} (paper convention) of unpruned -> {args.output}", file=sys.stdout)
    return 0
