"""`dop flops`: analytic prefill FLOPs of a model, unpruned vs under a policy (docs/design.md, "FLOPs")."""

from __future__ import annotations

import argparse
import json

from ..flops import count_flops, presets, resolve_arch
from ..policy import Policy, PolicyError
from . import COMMANDS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "flops",
        help=COMMANDS["flops"],
        description=(
            "Analytic prefill FLOPs (docs/design.md, 'FLOPs'). Convention 'dop': 2 FLOPs per multiply-add of "
            "every decoder matmul, text and visual tokens; 'paper': multiply-adds over visual "
            "tokens only, as published token-pruning tables count them."
        ),
    )

    p.add_argument(
        "--model", required=True, help=f"a preset ({', '.join(presets())}) or a local checkpoint folder"
    )
    p.add_argument("--policy", help="policy JSON file (default: unpruned)")
    p.add_argument("--visual-tokens", type=int, help="visual tokens per image (default: the model's typical count)")
    p.add_argument("--text-tokens", type=int, default=64, help="text tokens in the prompt (default: 64)")
    p.add_argument("--images", type=int, default=1, help="images in the prompt (default: 1)")
    p.add_argument("--convention", choices=("dop", "paper", "both"), default="dop")
    p.add_argument("--transfer", action="store_true", help="rescale a policy made for another layer count")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def _fmt_reduction(before: float, after: float) -> str:
    if after <= 0:
        return "all removed" if before > 0 else "-"
    if after == before:
        return "1.00x"
    return f"{before / after:.2f}x (-{100 * (1 - after / before):.1f}%)"


def _count(arch, policy, args, conventions, count_flops):
    return {
        c: count_flops(
            arch,
            policy,
            num_visual_tokens=args.visual_tokens,
            num_text_tokens=args.text_tokens,
            num_images=args.images,
            convention=c,
            transfer=args.transfer,
        )
        for c in conventions
    }


def run(args: argparse.Namespace) -> int:
    arch = resolve_arch(args.model)
    policy = Policy.from_json(args.policy) if args.policy else None
    conventions = ("dop", "paper") if args.convention == "both" else (args.convention,)
    try:
        reports = _count(arch, policy, args, conventions, count_flops)
    except PolicyError as e:
        if "num_layers" in str(e) and not args.transfer:
            raise PolicyError(f"{e}, or pass --transfer here") from None
        raise
    if args.json:
        print(json.dumps({c: r.to_dict() for c, r in reports.items()}, indent=2))
        return 0
    first = next(iter(reports.values()))
    images = len(first.num_visual_tokens)
    vis = first.num_visual_tokens[0] if images and len(set(first.num_visual_tokens)) == 1 else list(first.num_visual_tokens)
    print(f"model     {arch.name}" + (f" ({arch.hub_id})" if arch.hub_id and arch.hub_id != arch.name else ""))
    print(f"prompt    {images} image(s) x {vis} visual + {first.num_text_tokens} text tokens")
    print(f"policy    {args.policy or 'none (unpruned)'}")
    rows = []
    for c, r in reports.items():
        if c == "dop":
            rows.append(("decoder TFLOPs (dop)", r.decoder_unpruned, r.decoder))
            rows.append(("total TFLOPs (dop)", r.total_unpruned, r.total))
        else:
            rows.append(("decoder TMACs (paper, visual)", r.decoder_unpruned, r.decoder))
    width = max(len(name) for name, _, _ in rows)
    print(f"{'':{width}}  {'unpruned':>10}  {'pruned':>10}  reduction")
    for name, before, after in rows:
        print(f"{name:{width}}  {before / 1e12:10.3f}  {after / 1e12:10.3f}  {_fmt_reduction(before, after)}")
    if "dop" in reports:
        r = reports["dop"]
        print(
            f"(total = decoder + vision tower {r.vision / 1e12:.3f} + projector {r.projector / 1e12:.3f}"
            f" + lm_head {r.lm_head / 1e12:.5f} TFLOPs)"
        )
    return 0
