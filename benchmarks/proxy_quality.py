"""How well the additive proxy ranks policies, in-sample and on held-out samples (issue 17).

The divergence table is built on the first ``--samples`` validation samples (as ``dop
search`` does); ``--random`` random feasible policies at the budget are drawn
(:func:`dop.search.spaces.draw_feasible`, each ``--draw``) and their true first-token KL is
measured on the same samples (in-sample, what ``--verify`` reports today) and on the next
``--held-out`` samples of the split, which the table never saw. Printed per space and draw:
Spearman proxy vs truth over all random policies and over those closer than the blind
policy (every visual op pruned), how many are at or beyond blind, and the chosen policy's
true divergence on both sample sets.

    python benchmarks/proxy_quality.py [--spaces dop,multigroup] [--draws uniform,ordered] \\
        [--samples 25] [--held-out 40] [--random 50] [--budget 0.25] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from dop.evaluate.datasets import load_dataset
from dop.evaluate.loading import load_model
from dop.policy import Policy
from dop.runtime import apply_policy
from dop.runtime.replay import batch_last_logits, last_logits
from dop.search import search
from dop.search.cost import CostModel
from dop.search.divergence import kl_divergence, prepare_samples, reference_shape
from dop.search.spaces.solver import Solver
from dop.search.spaces import draw_feasible
from dop.batching import collated
from dop.search.verify import spearman


def true_batched(model, prepared, refs, policy, ranker, batch: int = 8) -> float:
    """Mean true divergence of ``policy``, ``batch`` samples per padded forward (equal to one
    at a time within float32 noise, docs/benchmarks.md "Table cost")."""
    per = []
    with torch.inference_mode(), apply_policy(model, policy, ranker=ranker):
        for first in range(0, len(prepared), batch):
            chunk = prepared[first:first + batch]
            q = batch_last_logits(model, collated(model, [s.inputs for s in chunk]))
            per += [kl_divergence(p, row) for p, row in zip(refs[first:first + batch], q)]
    return sum(per) / len(per)


def truths(model, sets: dict, policies: list[Policy], ranker) -> dict[str, list[float]]:
    """True divergence of every policy on every sample set (``{name: (prepared, refs)}``)."""
    return {name: [true_batched(model, prep, refs, pol, ranker) for pol in policies]
            for name, (prep, refs) in sets.items()}


def judge(proxy: list[float], truth: list[float], blind: float) -> dict:
    rows = [{"proxy": p, "true": t} for p, t in zip(proxy, truth)]
    closer = [r for r in rows if r["true"] < blind * (1 - 1e-6)]
    return {"spearman": spearman(rows)[0], "spearman_below_blind": spearman(closer)[0],
            "at_least_blind": len(rows) - len(closer), "n": len(rows)}


def one_space(model, processor, prepared, sets, space: str, args) -> dict:
    res = search(model, processor, prepared, budget=args.budget, space=space, ranker=args.ranker,
                 progress=False, seed=args.seed)
    sp, sol = res.space, res.results[0].solution
    counts, text = reference_shape(prepared)
    solver = Solver(sp, res.table.proxy(sp), CostModel(model, counts, text, "dop"))
    blind_policy = Policy.token_pruning(sp.num_layers, 0.0, sp.min_depth)
    fixed = truths(model, sets, [sol.policy, blind_policy], args.ranker)
    out = {"chosen": {"params": sol.assign, "proxy": sol.predicted, **{k: v[0] for k, v in fixed.items()}},
           "blind": {k: v[1] for k, v in fixed.items()}, "draws": {}}
    for draw in args.draws if sp.name == "multigroup" else args.draws[:1]:  # no rank groups: one draw
        assigns = draw_feasible(sp, solver.cost.policy_cost, sol.limit, args.random, args.seed, draw)
        proxy = [solver.proxy_of(a) for a in assigns]
        truth = truths(model, sets, [sp.policy(a) for a in assigns], args.ranker)
        out["draws"][draw] = {k: judge(proxy, t, out["blind"][k]) for k, t in truth.items()}
        out["draws"][draw]["assigns"] = [dict(a, proxy=p, **{k: t[i] for k, t in truth.items()})
                                         for i, (a, p) in enumerate(zip(assigns, proxy))]
    return out


def report(space: str, r: dict) -> None:
    c = r["chosen"]
    print(f"[{space}] chosen {c['params']}: proxy {c['proxy']:.5f}, true in-sample {c['in-sample']:.5f}, "
          f"held-out {c['held-out']:.5f}; blind in-sample {r['blind']['in-sample']:.3f}, held-out {r['blind']['held-out']:.3f}")
    for draw, d in r["draws"].items():
        for where in ("in-sample", "held-out"):
            j = d[where]
            below = "-" if j["spearman_below_blind"] is None else f"{j['spearman_below_blind']:.3f}"
            print(f"  draw {draw:8s} {where:9s}: Spearman {j['spearman']:.3f}, at/beyond blind {j['at_least_blind']} "
                  f"of {j['n']}, Spearman over the rest {below}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--data", default="shapes:val")
    ap.add_argument("--spaces", default="dop,multigroup")
    ap.add_argument("--draws", default="uniform,ordered")
    ap.add_argument("--samples", type=int, default=25)
    ap.add_argument("--held-out", type=int, default=40)
    ap.add_argument("--random", type=int, default=50)
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--ranker", default="vispruner")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    args.draws = args.draws.split(",")
    torch.set_num_threads(args.threads)
    model, processor = load_model(args.model)
    samples = load_dataset(args.data, limit=args.samples + args.held_out)
    prepared = prepare_samples(model, processor, samples)
    sets = {}
    with torch.inference_mode():
        for name, prep in (("in-sample", prepared[:args.samples]), ("held-out", prepared[args.samples:])):
            sets[name] = (prep, [last_logits(model, s.inputs) for s in prep])
    results = {}
    for space in args.spaces.split(","):
        results[space] = one_space(model, processor, prepared[:args.samples], sets, space, args)
        report(space, results[space])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
