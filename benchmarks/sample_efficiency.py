"""Sample efficiency of the search (issue 22): held-out KL and proxy Spearman by search samples.

The held-out KL of the chosen policy and the proxy's Spearman, against the number of search
samples.

For each model and space, the search runs on the first N samples of ``--data`` for every N
of ``--sizes`` (one search per N, every budget from its one table); a fixed held-out set,
``--held-out`` samples of ``--data`` from index ``--held-out-start`` (disjoint from every
search set), judges it:

- the chosen policy's true first-token KL on the held-out set (and on its own N samples);
- the verification's Spearman (``--verify K``): the proxy of K random feasible policies at the
  budget (:class:`dop.search.verify.Candidates`, ``--verify-draw``) against their true KL on
  the held-out set;
- token pruning at the same FLOPs on the held-out set, for scale.

A policy's held-out KL does not depend on N, so each distinct policy is measured once
(the random draws mostly repeat across N). Search options pass through: ``--space``,
``--budgets``, ``--kinds``, ``--ranker``, and ``--candidates K`` where ``search()`` takes it.
Writes a JSON and a plot (PNG).

    OMP_NUM_THREADS=1 python benchmarks/sample_efficiency.py --models demo,demo-base \\
        --spaces dop,multigroup --sizes 10,25,50,100 --held-out-start 200 --held-out 50 \\
        --verify 20 --json sample_efficiency.json --plot docs/sample_efficiency.png
    python benchmarks/sample_efficiency.py --plot-only A.json,B.json --plot docs/sample_efficiency.png
"""

from __future__ import annotations

import json
import time

import torch

from dop.evaluate.datasets import load_dataset
from dop.evaluate.loading import load_model
from dop.search import search
from dop.search.cost import CostModel
from dop.search.divergence import prepare_samples
from dop.search import Solver
from dop.search.table import DivergenceTable, samples_fingerprint
from dop.search.verify import Candidates, spearman
from interactions import Meter, search_options  # benchmarks/interactions.py (Meter: each policy measured once)


def sub_table(full: DivergenceTable, prepared, n: int) -> DivergenceTable:
    """The table of the first ``n`` samples: the per-sample entries of ``full`` (each entry is
    one sample's own forward, so it equals the table built on those samples alone)."""
    key = dict(full.key, samples=n, fingerprint=samples_fingerprint(prepared[:n]))
    entries = {name: {v: per[:n] for v, per in vals.items()} for name, vals in full.entries.items()}
    return DivergenceTable(key, n, entries)


def one_size(model, processor, prepared, n, held, sp_name, args, full=None) -> tuple[list[dict], DivergenceTable]:
    t0 = time.perf_counter()
    extra = {} if args.candidates is None else {"candidates": args.candidates}
    try:
        res = search(model, processor, prepared[:n], budgets=args.budgets, space=sp_name, ranker=args.ranker,
                     kinds=args.kinds if sp_name == "multigroup" else None, progress=False, seed=args.seed,
                     table=None if full is None else sub_table(full, prepared, n), **extra)
    except TypeError as e:
        if extra and "candidates" in str(e):
            raise SystemExit("--candidates: this dop's search() has no candidates option (needs the certified "
                             "choice of issue 22)") from None
        raise
    search_s = time.perf_counter() - t0
    sp, shape = res.space, res.shape
    own = Meter(model, prepared[:n], args.ranker)
    costs = {c: CostModel(model, shape["visual_tokens"], shape["text_tokens"], c) for c in ("dop", "paper")}
    out = []
    for r in res.results:
        solver = Solver(sp, res.table.proxy(sp), costs[r.solution.convention])
        cand = Candidates.draw(sp, solver, r.solution, args.verify, args.seed, args.verify_draw)
        held_before = held.evals
        truths = held([r.policy, *cand.policies] + ([cand.token_policy] if cand.token_policy is not None else []))
        rows = [dict(row, true=t) for row, t in zip(cand.random, truths[1:1 + len(cand.policies)])]
        rho = spearman(rows)[0]
        (in_sample,) = own([r.policy])
        out.append({"n": n, "budget": r.budget.spec, "assign": r.solution.assign, "proxy": r.solution.predicted,
                    "in_sample": in_sample, "heldout": truths[0], "spearman_heldout": rho, "random": len(rows),
                    "token_pruning_heldout": truths[-1] if cand.token_policy is not None else None,
                    "search_s": search_s,
                    "heldout_policies_measured": held.evals - held_before})
        rs = "-" if rho is None else f"{rho:.3f}"
        print(f"  N={n:<4} {r.budget.spec:<11} chosen {sp.describe(r.solution.assign)}: in-sample {in_sample:.5f}, "
              f"held-out {truths[0]:.5f}; Spearman held-out {rs} ({len(rows)} random); "
              f"search {search_s:.1f} s, {held.evals - held_before} new held-out policies", flush=True)
    return out, res.table


def plot(results: dict, path: str) -> None:
    import matplotlib  # spares matplotlib until a plot is asked for
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(k.split("/")[0] for k in results))
    fig, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 7), squeeze=False)
    for j, m in enumerate(models):
        for key, rows in results.items():
            if key.split("/")[0] != m:
                continue
            space = key.split("/")[1]
            for b in dict.fromkeys(r["budget"] for r in rows):
                rs = sorted((r for r in rows if r["budget"] == b), key=lambda r: r["n"])
                ns = [r["n"] for r in rs]
                style = "-o" if space == "dop" else "--s"
                axes[0][j].plot(ns, [r["heldout"] for r in rs], style, label=f"{space} {b}")
                axes[1][j].plot(ns, [r["spearman_heldout"] if r["spearman_heldout"] is not None else float("nan")
                                     for r in rs], style, label=f"{space} {b}")
        axes[0][j].set_yscale("log")
        axes[0][j].set_title(f"{m}: chosen policy, held-out first-token KL")
        axes[1][j].set_title(f"{m}: proxy Spearman, held-out")
        axes[1][j].set_ylim(-1, 1)
        for ax in axes[:, j]:
            ax.set_xscale("log")
            ax.set_xlabel("search samples")
            ax.set_xticks(sorted({r["n"] for rows in results.values() for r in rows}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.grid(True, alpha=0.3)
        axes[0][j].set_ylabel("nats")
        axes[1][j].set_ylabel("Spearman")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = search_options(__doc__)
    ap.add_argument("--sizes", default="10,25,50,100")
    ap.add_argument("--held-out-start", type=int, default=200)
    ap.add_argument("--held-out", type=int, default=50)
    ap.add_argument("--verify", type=int, default=20, metavar="K")
    ap.add_argument("--verify-draw", default="ordered")
    ap.add_argument("--candidates", type=int, default=None, metavar="K",
                    help="passed to search() (the certified choice), when it takes it")
    ap.add_argument("--plot", metavar="PNG")
    ap.add_argument("--plot-only", metavar="JSON", help="only draw --plot from JSONs this script wrote (comma-separated, merged)")
    args = ap.parse_args(argv)
    if args.plot_only:
        merged = {}
        for path in args.plot_only.split(","):
            with open(path) as fh:
                merged.update(json.load(fh)["results"])
        plot(merged, args.plot or "sample_efficiency.png")
        return
    args.budgets = args.budgets.split(",")
    sizes = [int(x) for x in args.sizes.split(",")]
    if args.held_out_start < max(sizes):
        raise SystemExit(f"--held-out-start {args.held_out_start} overlaps the largest search set ({max(sizes)})")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = {}
    for name in args.models.split(","):
        model, processor = load_model(name)
        samples = load_dataset(args.data, limit=args.held_out_start + args.held_out)
        if len(samples) < args.held_out_start + args.held_out:
            raise SystemExit(f"{args.data} holds {len(samples)} samples; the held-out set needs "
                             f"{args.held_out_start + args.held_out}")
        prepared = prepare_samples(model, processor, samples[:max(sizes)] + samples[args.held_out_start:])
        search_set, held = prepared[:max(sizes)], Meter(model, prepared[max(sizes):], args.ranker)
        for sp_name in args.spaces.split(","):
            print(f"== {name}, space {sp_name}, held-out {args.data} {args.held_out_start}-"
                  f"{args.held_out_start + args.held_out - 1}", flush=True)
            rows, full = [], None
            for n in sorted(sizes, reverse=True):  # the largest set's table serves the smaller ones
                got, tab = one_size(model, processor, search_set, n, held, sp_name, args, full)
                rows, full = got + rows, full or tab
                if n == max(sizes):
                    print(f"  table of {n} samples: {tab.layer_evals} decoder-layer calls, {tab.wall_s:.1f} s",
                          flush=True)
            results[f"{name}/{sp_name}"] = rows
        print(f"== {name}: {held.evals} policies measured on the held-out set", flush=True)
    print(f"wall time {time.perf_counter() - t0:.1f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=1, default=str)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
