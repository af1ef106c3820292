"""`dop search`: find the policy closest to the unpruned model under a FLOPs budget.

    dop search --model demo --data shapes:val --samples 25 --budget 0.14 --ranker vispruner -o policy.json
    dop search --model demo --data shapes:val --budgets 0.1,0.14,0.25 --table table.json -o policy.json
    dop search --model llava-hf/llava-1.5-7b-hf --data val.jsonl --budget tokens:64 --space multigroup --verify 50
    dop search --model demo --data shapes:val --budget 0.25 --verify 50 --verify-data shapes:val:7 -o policy.json

With several budgets, ``-o policy.json`` becomes ``policy.<budget>.json`` per budget (or put
``{budget}`` in the name). ``--table`` checkpoints the divergence table as it fills; running
the same command again resumes it (or, once complete, solves new budgets at no model cost).
``--verify K`` measures the same policies on the searched samples and on held-out ones
(``--verify-data``, default the samples of ``--data`` after the searched ones) and prints
both side by side (docs/design.md, "Held-out verification"). ``--candidates K`` measures the
K best policies by proxy and keeps the closest (docs/design.md, "Certified choice").
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from .. import distributed
from ..evaluate.datasets import load_dataset
from ..evaluate.heldout import heldout_samples
from ..evaluate.loading import prompt_builder_for
from ..jsonio import write_json_atomic
from ..outputs import check_output_file, output_lock, write_or_rescue
from ..rankers import resolve_ranker
from ..report.certified import name_outliers
from ..search import METHODS, search
from ..search.certify import DEFAULT_CANDIDATES
from ..search.cost import BUDGET_HELP, parse_budget
from ..search.robust import AGGREGATES, DEFAULT_AGGREGATE, describe
from ..search.spaces import check_groups, check_kinds
from ..search.table import DivergenceTable
from . import COMMANDS
from .method_search import check_method_options, format_method_summary, run_method
from .options import COLUMNS_HELP, DATA_METAVAR, add_model_runtime_options, apply_image_limit, load_model_quietly


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "search",
        help=COMMANDS["search"],
        description=(
            "Measure each policy parameter's first-token KL divergence alone on validation samples "
            "(the additive proxy), then pick exactly the policy with the least summed divergence whose "
            "decoder FLOPs fit the budget."
        ),
    )
    p.add_argument("--model", required=True, metavar="demo|demo-base|HUB_ID|PATH",
                   help="'demo', 'demo-base' (its control, not trained for pruning), a hub id (owner/name) "
                        "or a local checkpoint folder")
    p.add_argument("--data", required=True, metavar=DATA_METAVAR,
                   help="validation data: the synthetic benchmark split, a JSONL file / folder, or a Hugging "
                        "Face data set (parquet, save_to_disk folder, hf:OWNER/NAME[:CONFIG]:SPLIT)")
    p.add_argument("--columns", metavar="ROLE=COL,...", help=COLUMNS_HELP)
    p.add_argument("--samples", type=int, default=25, metavar="N", help="validation samples (default 25)")
    p.add_argument("--budget", metavar="B", help="the budget: " + BUDGET_HELP.replace("%", "%%"))
    p.add_argument("--budgets", metavar="B1,B2,...", help="several budgets from one table (one policy each)")
    p.add_argument("--space", default="dop", metavar="NAME",
                   help="a search space or a compared method (default dop): dop: n_v, D_attn, D_mlp (the paper's); "
                        "multigroup: one depth per (op kind, rank group); gsop, shortv, vtw: the compared methods "
                        "by their own rules (docs/methods.md)")
    p.add_argument("--metric", default="kl", choices=("kl", "accuracy"),
                   help="gsop: what each greedy step minimises per FLOP saved, the first-token KL (default) or "
                        "the loss of task accuracy on the samples' answers")
    p.add_argument("--groups", metavar="F1,F2,...",
                   help="multigroup: cumulative group fractions (default 0.125,0.25,0.5,1)")
    p.add_argument("--kinds", metavar="K1,K2,...", help="multigroup: op kinds, attn,mlp (default) or attn_q,attn_kv,mlp")
    p.add_argument("--stride", type=int, default=1, metavar="S",
                   help="measure every S-th depth and interpolate in between (default 1: all depths)")
    p.add_argument("--nv-stride", type=int, default=None, metavar="S",
                   help="dop: measure every S-th n_v and interpolate (default: about 32 points)")
    p.add_argument("--min-tokens", type=int, default=0, metavar="M",
                   help="the top-M ranked visual tokens are processed by every module at every layer")
    p.add_argument("--convention", default="dop", choices=("dop", "paper"),
                   help="FLOPs convention of fraction/TFLOPs budgets (tokens:N budgets are always paper)")
    p.add_argument("--ranker", default="vispruner", metavar="NAME", help="visual-token ranker (default vispruner)")
    p.add_argument("-o", "--output", required=True, metavar="policy.json", help="where to write the policy")
    p.add_argument("--table", metavar="table.json", help="checkpoint / resume the divergence table here")
    p.add_argument("--verify", type=int, default=0, metavar="K",
                   help="measure the true divergence of the chosen policy, K random feasible ones (Spearman) "
                        "and token pruning at the same budget, on the searched samples and on held-out ones")
    p.add_argument("--verify-data", metavar="SPEC",
                   help="held-out samples for --verify (same grammar as --data; default: the samples of --data "
                        "after the searched ones)")
    p.add_argument("--verify-samples", type=int, default=None, metavar="N",
                   help="held-out samples for --verify (default: as many as --samples)")
    p.add_argument("--verify-draw", choices=("ordered", "uniform"), default="ordered",
                   help="how --verify draws its random policies: ordered (each op kind's depths non-increasing "
                        "over the rank groups; default) or uniform (docs/design.md, \"Held-out verification\")")
    p.add_argument("--candidates", type=int, default=None, metavar="K",
                   help="certified choice: measure the true divergence of the K best policies by proxy on the "
                        f"search samples and choose the closest (default {DEFAULT_CANDIDATES}; 1: the proxy's choice, "
                        "nothing measured)")
    p.add_argument("--aggregate", choices=AGGREGATES, default=None,
                   help="how per-sample divergences become one figure in the proxy, the certified choice and "
                        f"--verify: {DEFAULT_AGGREGATE} (default), median, or trimmed (10%% of the samples dropped "
                        "at each end)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed (random rankers, --verify policies)")
    p.add_argument("--json", metavar="OUT", help="write the full summary as JSON")
    p.add_argument("--batch-size", type=int, default=1, metavar="N",
                   help="validation samples per forward while the divergence table fills (default 1); "
                        "the table equals batch size 1's")
    add_model_runtime_options(p)
    p.set_defaults(func=run)


def _outputs(path: str, budgets: list[str]) -> list[str]:
    if len(budgets) == 1 and "{budget}" not in path:
        return [path]
    root, ext = os.path.splitext(path)
    safe = [b.replace(":", "-").replace("/", "-") for b in budgets]
    if "{budget}" in path:
        return [path.replace("{budget}", s) for s in safe]
    return [f"{root}.{s}{ext or '.json'}" for s in safe]


def run(args: argparse.Namespace) -> int:
    # ---- checks that need nothing loaded
    budgets = ([args.budget] if args.budget else []) + (
        [b.strip() for b in args.budgets.split(",") if b.strip()] if args.budgets else [])
    if not budgets:
        raise ValueError("give --budget B or --budgets B1,B2,...")
    for b in budgets:
        parse_budget(b)
    if args.samples < 1:
        raise ValueError(f"--samples must be a positive integer, got {args.samples}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.verify < 0:
        raise ValueError(f"--verify must be a non-negative integer, got {args.verify}")
    if not args.verify and (args.verify_data or args.verify_samples is not None):
        raise ValueError("--verify-data and --verify-samples apply only together with --verify K")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be a positive integer, got {args.threads}")
    check_method_options(args)  # an unknown --space, or an option it does not take
    if args.space in METHODS and (args.candidates is not None or args.aggregate is not None):
        raise ValueError(f"--candidates and --aggregate apply to the search spaces, not {args.space}")
    if args.candidates is not None and args.candidates < 1:
        raise ValueError(f"--candidates must be a positive integer, got {args.candidates}")
    groups = check_groups(args.groups.split(",")) if args.groups else None
    kinds = check_kinds(args.kinds) if args.kinds else None
    outputs = _outputs(args.output, budgets)
    main_outputs = distributed.is_main()  # under torchrun rank 0 writes -o and --json; every rank checkpoints --table
    for o in outputs if main_outputs else ():
        check_output_file("-o", o)
    for flag, path in (("--table", args.table), ("--json", args.json if main_outputs else None)):
        if path:
            check_output_file(flag, path)
    apply_image_limit(args)

    resolve_ranker(args.ranker)

    samples = load_dataset(args.data, limit=args.samples, columns=args.columns)
    heldout = _heldout(args) if args.verify else (None, None)
    if args.table and os.path.exists(args.table):
        DivergenceTable.load(args.table)  # unreadable files fail before the model loads

    threads_before = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        with output_lock([*outputs, args.table, args.json]):
            return _run_loaded(args, samples, heldout, budgets, outputs, groups, kinds)
    finally:
        torch.set_num_threads(threads_before)


def _heldout(args) -> tuple[list | None, str]:
    """The held-out samples of --verify (None, with a note, where --data has none left) and
    where they come from."""
    n = args.samples if args.verify_samples is None else args.verify_samples
    rows, where = heldout_samples(args.data, args.samples, n, args.verify_data, args.columns)
    if not rows and distributed.is_main():
        print(f"note: no held-out samples ({where}); --verify reports in-sample figures only "
              "(give --verify-data)", file=sys.stderr)
    return rows or None, where


def _run_loaded(args, samples, heldout, budgets, outputs, groups, kinds) -> int:
    t0 = time.perf_counter()
    model, processor = load_model_quietly(args, getattr(torch, args.dtype))
    model = model.to(distributed.device_for(args.device))
    build_prompt = prompt_builder_for(args.model)
    held = None
    if args.space in METHODS:
        result, held = run_method(args, model, processor, samples, heldout[0], budgets, build_prompt)
    else:
        try:
            result = search(
                model, processor, samples, budgets=budgets, space=args.space, ranker=args.ranker,
                groups=groups, kinds=kinds, stride=args.stride, nv_stride=args.nv_stride, min_tokens=args.min_tokens,
                convention=args.convention, table=args.table, verify_k=args.verify, verify_samples=heldout[0],
                verify_draw=args.verify_draw, seed=args.seed, build_prompt=build_prompt,
                progress=not args.no_progress, meta={"model": args.model, "data": args.data},
                batch_size=args.batch_size, candidates=_or(args.candidates, DEFAULT_CANDIDATES),
                aggregate=_or(args.aggregate, DEFAULT_AGGREGATE),
            )
        except KeyboardInterrupt:
            if args.table:
                print(f"the divergence table so far is saved in {args.table}; run the same command again to resume",
                      file=sys.stderr)
            raise
    wall = time.perf_counter() - t0
    if not distributed.is_main():
        return 0  # rank 0 writes the outputs and prints the summary
    print(format_summary(result, args, outputs, wall) if held is None
          else format_method_summary(result, held, args, outputs, wall))
    for r, out in zip(result.results, outputs):
        write_or_rescue("-o", out, r.policy.to_json)
    if args.json:
        doc = {"format": "dop-search/1", "model": args.model, "data": args.data, "ranker": args.ranker,
               "seed": args.seed, "verify_data": heldout[1], "wall_s": wall, **result.to_dict(),
               **({} if held is None else {"heldout_divergence": held}), "outputs": outputs}
        write_or_rescue("--json", args.json, lambda path: write_json_atomic(path, doc))
    return 0


def _or(given, default):
    return default if given is None else given


def _fl(x: float, paper: bool = False) -> str:
    unit = "MACs" if paper else "FLOPs"
    for p, s in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= s:
            return f"{x / s:.3g} {p}{unit}"
    return f"{x:.3g} {unit}"


def format_summary(result, args, outputs, wall: float) -> str:
    sp = result.space
    lines = [
        f"model {args.model}   data {args.data} ({result.table.num_samples} samples)   ranker {args.ranker}   "
        f"space {sp.name}   seed {args.seed}",
        f"reference prompt: {result.shape['visual_tokens']} visual + {result.shape['text_tokens']} text tokens; "
        f"{sp.num_layers} decoder layers",
        f"divergence table: {result.layer_evals} decoder-layer evaluations (naive: {result.naive_layer_evals}, "
        f"{result.layer_evals / max(1, result.naive_layer_evals):.0%})" + (f", saved in {args.table}" if args.table else ""),
    ]
    if result.certify_evaluations:
        lines.append(f"certified choice: {result.certify_evaluations} candidate policies measured on every search "
                     f"sample, {result.certify_layer_evals} decoder-layer evaluations "
                     f"({result.certify_layer_evals / max(1, result.layer_evals):.0%} of the table's), "
                     f"{result.certify_s:.1f} s (table {result.table_s:.1f} s)")
    if result.aggregate != DEFAULT_AGGREGATE:
        lines.append(f"per-sample divergences aggregated by the {describe(result.aggregate)}")
    if result.heldout_samples:
        lines.append(f"held-out verification on {result.heldout_samples} samples the search did not use")
    for r, out in zip(result.results, outputs):
        f = r.flops
        lines += [
            "",
            f"budget {r.budget.spec} ({r.convention} convention) -> {out}",
            f"  parameters: {sp.describe(r.params)}",
            f"  policy: {r.policy.describe()}",
            f"  decoder FLOPs (dop):   {_fl(f['dop']['before'])} -> {_fl(f['dop']['after'])} ({f['dop']['fraction']:.1%})",
            f"  decoder MACs (paper):  {_fl(f['paper']['before'], True)} -> {_fl(f['paper']['after'], True)} "
            f"({f['paper']['fraction']:.1%})",
            f"  predicted divergence (proxy): {r.predicted:.5g}",
        ]
        if r.note:
            lines.append(f"  note: {r.note}")
        lines += certified_lines(r.certified, sp.describe)
        lines += _verification_lines(r, sp.n_ref)
    lines += ["", f"wall time {wall:.1f} s (divergence table {result.table_s:.1f} s, solving and the certified choice "
                  f"{result.certify_s:.1f} s, verification {result.verify_s:.1f} s, the rest loading)"]
    return "\n".join(lines)


def certified_lines(c, describe_params) -> list[str]:
    """The candidates of a certified choice: proxy, true divergence on the search samples
    (and on held-out ones where measured), which was chosen, and the outlier samples."""
    if c is None:
        return []
    held = c.heldout is not None
    lines = [f"  certified choice among the {len(c.candidates)} best policies by proxy "
             f"(true divergence, {c.aggregate}, on the {c.samples} search samples"
             + (f"; held-out: {c.heldout_samples} samples the search did not use)" if held else ")"),
             f"    {'#':>3}  {'proxy':>10}  {'true':>10}" + (f"  {'held-out':>10}" if held else "") + "  parameters"]
    for i, row in enumerate(c.candidates):
        mark = "*" if i == c.chosen else " "
        h = f"  {c.heldout[i]:>10.5g}" if held else ""
        lines.append(f"  {mark} {i + 1:>3}  {row['proxy']:>10.5g}  {row['true']:>10.5g}{h}  "
                     f"{describe_params(row['params'])}")
    lines.append(f"    chosen: #{c.chosen + 1} (* above)")
    if held and c.spearman_heldout is not None:
        lines.append(f"    Spearman over the candidates, held-out truth vs the search samples' ranking: "
                     f"{c.spearman_heldout:.3f} (vs the proxy: "
                     + ("-" if c.spearman_proxy_heldout is None else f"{c.spearman_proxy_heldout:.3f}") + ")")
    lines += outlier_lines(c.outliers, "search samples")
    return lines


def outlier_lines(found: list[dict], where: str) -> list[str]:
    """One line naming the outlier samples (divergence over 10x the median) of the chosen policy."""
    if not found:
        return []
    return [f"    outliers among the {where} (chosen policy's divergence over 10x its median): {name_outliers(found)}"]


def _verification_lines(r, n_ref: int) -> list[str]:
    """The true divergences of ``--verify``: one column per sample set (in-sample, and
    held-out where measured), then a warning when the choice is further from the unpruned
    model than token pruning or the blind policy (on the held-out samples when measured)."""
    sets = [v for v in (r.verification, r.heldout) if v is not None]
    if not sets:
        return []
    lines = _single_set_lines(sets[0], n_ref) if len(sets) == 1 else _side_by_side_lines(sets, n_ref)
    v = sets[-1]
    lines += outlier_lines(v.outliers, "held-out samples" if len(sets) > 1 else "search samples")
    tp = v.token_pruning
    worse = [name for name, ref in (("token pruning at the same budget", tp["true"] if tp else None),
                                    ("the blind policy", v.blind_true))
             if ref is not None and v.chosen_true > ref]
    if worse:
        where = " on the held-out samples" if len(sets) > 1 else ""
        lines.append(f"  warning: the chosen policy is further from the unpruned model than {' and '.join(worse)}"
                     f"{where}; the proxy does not rank this model's policies well here (see the Spearman above)")
    return lines


def _single_set_lines(v, n_ref: int) -> list[str]:
    lines = [f"  true divergence: {v.chosen_true:.5g}"]
    if v.spearman is not None:
        lines.append(f"  Spearman proxy vs truth over {len(v.random)} random feasible policies: {v.spearman:.3f}")
    elif v.random:
        lines.append(f"  Spearman: undefined over {len(v.random)} random policies (constant values)")
    if v.blind_true is not None and v.random:
        lines.append(f"  blind policy (no visual operation at all): true divergence {v.blind_true:.5g}; "
                     f"{v.n_at_least_blind} of {len(v.random)} random policies are at least as far"
                     + (f" (Spearman over the others: {v.spearman_below_blind:.3f})"
                        if v.spearman_below_blind is not None else ""))
    tp = v.token_pruning
    if tp:
        lines.append(f"  token pruning at the same budget (keep {tp['n_keep']} of {n_ref}, same ranker): "
                     f"true divergence {tp['true']:.5g}")
    return lines


def _side_by_side_lines(sets, n_ref: int) -> list[str]:
    """In-sample and held-out figures of the same policies, one column each."""
    def g(x, fmt=".5g"):
        return "-" if x is None else format(x, fmt)

    tp = sets[0].token_pruning
    k = len(sets[0].random)
    rows = [("true divergence, chosen policy", [g(v.chosen_true) for v in sets])]
    if tp:
        rows.append((f"token pruning at the same budget (keep {tp['n_keep']} of {n_ref}, same ranker)",
                     [g(v.token_pruning["true"]) for v in sets]))
    rows.append(("blind policy (no visual operation at all)", [g(v.blind_true) for v in sets]))
    if k:
        rows += [(f"Spearman proxy vs truth over {k} random feasible policies", [g(v.spearman, ".3f") for v in sets]),
                 ("random policies at least as far as the blind one", [f"{v.n_at_least_blind} of {k}" for v in sets]),
                 ("Spearman over the others", [g(v.spearman_below_blind, ".3f") for v in sets])]
    head = [f"in-sample ({sets[0].num_samples})", f"held-out ({sets[1].num_samples})"]
    width = max(len(name) for name, _ in rows)
    lines = [f"  {'':<{width}}  {head[0]:>15}  {head[1]:>15}"]
    lines += [f"  {name:<{width}}  {a:>15}  {b:>15}" for name, (a, b) in rows]
    return lines
