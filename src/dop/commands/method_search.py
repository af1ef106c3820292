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

from ..search import METHODS, SPACES, SampleSet, prepare_samples, search_method

# options of the spaces' divergence table, which the methods do not take (argparse name, flag)
_TABLE_OPTIONS = (("groups", "--groups"), ("kinds", "--kinds"), ("table", "--table"), ("nv_stride", "--nv-stride"),
                  ("min_tokens", "--min-tokens"))


def searcher(name: str):
    """What ``--space name`` searches: a registered space class or a registered method
    (:data:`dop.search.SPACES`, :data:`dop.search.METHODS`); an unknown name is an error
    naming both lists."""
    if name in SPACES:
        return SPACES.get(name)
    if name in METHODS:
        return METHODS.get(name)
    raise ValueError(f"--space: unknown search space or method {name!r}; spaces: {', '.join(SPACES.names())}; "
                     f"methods: {', '.join(METHODS.names())}")


def check_method_options(args: argparse.Namespace) -> None:
    """Every option that means nothing to the searched space or method is an error (before
    any work): a method takes none of the divergence table's options, and an option only
    some spaces or methods take (``--metric``, ``--nv-stride``, ...) applies to those only."""
    chosen = searcher(args.space)
    if args.space in METHODS:
        given = [flag for name, flag in _TABLE_OPTIONS if getattr(args, name)] + (["--stride"] if args.stride != 1 else [])
        if given:
            raise ValueError(f"{', '.join(given)}: the divergence table's options apply to --space "
                             f"{' and '.join(SPACES.names())}, not {args.space}")
    owners: dict[str, tuple[object, list[str]]] = {}  # option -> (its "not given" value, who takes it)
    for name, entry in (*SPACES.items(), *METHODS.items()):
        for opt, unset in entry.options.items():
            owners.setdefault(opt, (unset, []))[1].append(name)
    for opt, (unset, names) in owners.items():
        if getattr(args, opt, unset) != unset and opt not in chosen.options:
            raise ValueError(f"--{opt.replace('_', '-')} applies to --space {' and '.join(names)} only")


def run_method(args, model, processor, samples, heldout, budgets, build_prompt):
    """Search the method, measure its policies on the held-out samples (if any) and return
    (the method's result, the held-out divergence per budget or None)."""
    extra = {opt: getattr(args, opt) for opt in METHODS.get(args.space).options}
    result = search_method(args.space, model, processor, samples, budgets=budgets, ranker=args.ranker,
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

