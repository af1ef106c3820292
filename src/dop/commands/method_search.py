"""`dop search --space gsop|shortv|vtw`: the compared methods of docs/methods.md, searched by
their own rules on the same samples and budgets as DOP, written as policy files.

    dop search --model demo --data shapes:val --budgets tokens:16,tokens:32 --space gsop -o gsop.json --verify 1
    dop search --model demo --data shapes:val --budget 0.4 --space shortv -o shortv.json

``--verify K`` (any K > 0) measures each method policy's first-token KL on the held-out
samples beside its in-sample figure; the random policies of a DOP space's verification have
no counterpart here.
"""

from __future__ import annotations

import argparse

METHOD_SPACES = ("gsop", "shortv", "vtw")
# options of the DOP spaces' divergence table, which the methods do not take
_TABLE_OPTIONS = (("groups", "--groups"), ("kinds", "--kinds"), ("table", "--table"), ("nv_stride", "--nv-stride"),
                  ("min_tokens", "--min-tokens"))


def check_method_options(args: argparse.Namespace) -> None:
    """Every option that means nothing to a method space is an error (before any work)."""
    if args.space not in METHOD_SPACES:
        if args.metric != "kl":
            raise ValueError("--metric applies to --space gsop only")
        return
    given = [flag for name, flag in _TABLE_OPTIONS if getattr(args, name)] + (["--stride"] if args.stride != 1 else [])
    if given:
        raise ValueError(f"{', '.join(given)}: the divergence table's options apply to --space dop and multigroup, "
                         f"not {args.space}")
    if args.metric != "kl" and args.space != "gsop":
        raise ValueError("--metric applies to --space gsop only")


def run_method(args, model, processor, samples, heldout, budgets, outputs, build_prompt):
    """Search the method, measure its policies on the held-out samples (if any) and return
    (the method's result, the held-out divergence per budget or None)."""
    from dop.search import methods  # lazy: spares numpy, torch, transformers until used
    from dop.search.divergence import prepare_samples  # lazy: spares torch until used
    from dop.search.verify import SampleSet  # lazy: spares torch until used

    extra = {"metric": args.metric} if args.space == "gsop" else {}
    result = methods.search(args.space, model, processor, samples, budgets=budgets, ranker=args.ranker,
                            convention=args.convention, seed=args.seed, build_prompt=build_prompt,
                            progress=not args.no_progress, meta={"model": args.model, "data": args.data},
                            batch_size=args.batch_size, **extra)
    held = [None] * len(result.results)
    if heldout:
        held = SampleSet.of(model, prepare_samples(model, processor, heldout, build_prompt)).divergences(
            model, [(r.policy, r.policy.ranker) for r in result.results])
    return result, held


def format_method_summary(result, held: list, args, outputs, wall: float) -> str:
    """What `dop search` prints for a method: per budget its policy, FLOPs and divergences."""
    n = result.results[0].policy.meta.get("samples") if result.results else None
    lines = [f"model {args.model}   data {args.data} ({n} samples)   method {result.method}   ranker {args.ranker}   "
             f"seed {args.seed}",
             f"reference prompt: {result.shape['visual_tokens']} visual + {result.shape['text_tokens']} text tokens",
             f"{result.evaluations} policies measured, {result.layer_evals} decoder-layer evaluations "
             "(every one a full forward; docs/methods.md)"]
    for r, h, out in zip(result.results, held, outputs):
        f = r.flops
        lines += ["", f"budget {r.budget.spec} ({r.convention} convention) -> {out}",
                  f"  policy: {r.policy.describe()}",
                  f"  decoder FLOPs (dop):   {f['dop']['fraction']:.1%} of unpruned; decoder MACs (paper): "
                  f"{f['paper']['fraction']:.1%}",
                  f"  true divergence: in-sample {r.divergence:.5g}" + ("" if h is None else f", held-out {h:.5g}")]
        if r.note:
            lines.append(f"  note: {r.note}")
    lines += ["", f"wall time {wall:.1f} s (the method's search {result.wall_s:.1f} s)"]
    return "\n".join(lines)

