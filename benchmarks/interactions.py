"""Pairwise interactions of the additive proxy, and what a local refinement buys (issue 22).

Per model, space and budget, the table is built on the first ``--samples`` samples of
``--data`` and the solver's choice P taken (as ``dop search`` does); then, with the true
joint first-token KL f on the same samples (``SampleSet.divergences``):

- *interactions at the table's values*: for every pair of parameters P prunes, moved alone
  to P's values from the unpruned model, I(a, b) = f(a and b) - f(a) - f(b), the term the
  additive proxy leaves out; and how f(P) compares with the sum of the singles (the proxy)
  and with the sum plus every pair term (a second-order proxy);
- *local interactions around P*: each parameter lowered one grid step from P (move a),
  J(a, b) = f(P-a-b) - f(P-a) - f(P-b) + f(P), against the single steps' effects;
- *refinement*: :func:`dop.search.refine.refine` from P (``--refine-evals`` policies at
  most), and P, the refined policy and token pruning at the same FLOPs on held-out samples
  (``--held-out`` samples of ``--data`` after the searched ones), which the search never saw.

Pairs are labelled by what they share: kind (``attn``, ``mlp``, ...), group (same, adjacent),
depth band (depths within one layer). Every policy measured is counted and the wall time
printed.

    OMP_NUM_THREADS=1 python benchmarks/interactions.py --models demo,demo-base \\
        --spaces dop,multigroup [--kinds attn,mlp] [--budgets tokens:1/9,tokens:2/9,tokens:1/3] \\
        [--samples 25] [--held-out 25] [--refine-evals 32] --json interactions.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from dop.evaluate.datasets import load_dataset
from dop.evaluate.loading import load_model
from dop.search import search
from dop.search.cost import CostModel
from dop.search.divergence import prepare_samples
from dop.search.refine import refine
from dop.search.verify import SampleSet, token_pruning_at


class Meter:
    """True divergences on one sample set, each distinct policy measured once and counted."""

    def __init__(self, model, prepared, ranker):
        self.model, self.ranker = model, ranker
        self.ss = SampleSet.of(model, prepared)
        self.known, self.evals = {}, 0

    def __call__(self, policies: list) -> list[float]:
        new = [p for p in dict.fromkeys(policies) if p not in self.known]
        for p, t in zip(new, self.ss.divergences(self.model, [(p, self.ranker) for p in new])):
            self.known[p] = t
        self.evals += len(new)
        return [self.known[p] for p in policies]


def label(sp, a, b, assign) -> str:
    """What two parameters share: kinds, groups (same / adjacent / apart), depth band."""
    pa, pb = sp.param(a), sp.param(b)
    if pa.group is None:  # the dop space: n_v, D_attn, D_mlp
        return f"{a}x{b}"
    kinds = "+".join(sorted({pa.kind, pb.kind})) if pa.kind != pb.kind else f"{pa.kind} only"
    gap = abs(pa.group - pb.group)
    where = "same group" if gap == 0 else ("adjacent groups" if gap == 1 else "groups apart")
    band = "same band" if abs(assign[a] - assign[b]) <= 1 else "bands apart"
    return f"{kinds}, {where}, {band}"


def down_step(p, v):
    """The grid value below ``v`` (the table's measured values), None at the bottom."""
    below = [x for x in sorted(set(p.measured) | {p.unpruned}) if x < v]
    return below[-1] if below else None


def table_interactions(sp, assign, meter) -> dict:
    base = sp.baseline()
    pruned = [p.name for p in sp.params if assign[p.name] != p.unpruned]
    singles = dict(zip(pruned, meter([sp.single(n, assign[n]) for n in pruned])))
    pairs = list(itertools.combinations(pruned, 2))
    both = meter([sp.policy(dict(base, **{a: assign[a], b: assign[b]})) for a, b in pairs])
    (joint,) = meter([sp.policy(assign)])
    rows = [{"a": a, "b": b, "label": label(sp, a, b, assign), "fa": singles[a], "fb": singles[b], "fab": f,
             "I": f - singles[a] - singles[b]} for (a, b), f in zip(pairs, both)]
    additive = sum(singles.values())
    return {"singles": singles, "pairs": rows, "joint": joint, "additive": additive,
            "second_order": additive + sum(r["I"] for r in rows)}


def local_interactions(sp, assign, meter, max_pairs: int) -> dict:
    steps = {p.name: down_step(p, assign[p.name]) for p in sp.params}
    steps = {n: v for n, v in steps.items() if v is not None}
    (f0,) = meter([sp.policy(assign)])
    names = list(steps)
    single = dict(zip(names, meter([sp.policy(dict(assign, **{n: steps[n]})) for n in names])))
    pairs = list(itertools.combinations(names, 2))[:max_pairs]
    both = meter([sp.policy(dict(assign, **{a: steps[a], b: steps[b]})) for a, b in pairs])
    rows = [{"a": a, "b": b, "label": label(sp, a, b, assign), "da": single[a] - f0, "db": single[b] - f0,
             "J": f - single[a] - single[b] + f0} for (a, b), f in zip(pairs, both)]
    return {"f0": f0, "steps": steps, "single": {n: single[n] - f0 for n in names}, "pairs": rows}


def one(model, processor, prepared, held, sp_name, args, out: list, save=lambda: None) -> None:
    """Every budget of one space, appended to ``out`` (saved after each)."""
    t0 = time.perf_counter()
    res = search(model, processor, prepared, budgets=args.budgets, space=sp_name, ranker=args.ranker,
                 kinds=args.kinds if sp_name == "multigroup" else None, progress=False, seed=args.seed)
    table_s = time.perf_counter() - t0
    sp, proxy = res.space, res.table.proxy(res.space)
    shape = res.shape
    costs = {c: CostModel(model, shape["visual_tokens"], shape["text_tokens"], c) for c in ("dop", "paper")}
    for r in res.results:
        t1 = time.perf_counter()
        meter = Meter(model, prepared, args.ranker)
        assign = dict(r.solution.assign)
        inter = table_interactions(sp, assign, meter)
        n_inter = meter.evals
        local = local_interactions(sp, assign, meter, args.max_local_pairs) if args.max_local_pairs else None
        n_local = meter.evals - n_inter
        t2 = time.perf_counter()
        policy, trace = refine(model, meter.ss, sp, costs[r.solution.convention], r.solution.limit, assign, args.ranker,
                               max_evals=args.refine_evals, proxy=proxy)
        t3 = time.perf_counter()
        found = token_pruning_at(costs[r.solution.convention], sp.num_layers, sp.n_ref, r.solution.limit, sp.min_depth)
        tp = found[1] if found else None
        h = held([r.solution.policy, policy] + ([tp] if tp is not None else []))
        out.append({"budget": r.budget.spec, "assign": assign, "proxy": r.solution.predicted,
                    "table": inter, "local": local, "evals": {"table": n_inter, "local": n_local,
                                                              "refine": trace.evals},
                    "refine": trace.to_dict(), "refined_assign": trace.best,
                    "heldout": {"chosen": h[0], "refined": h[1], "token_pruning": h[2] if tp is not None else None,
                                "token_keep": found[0] if found else None},
                    "wall_s": {"table_build": table_s, "interactions": t2 - t1, "refine": t3 - t2}})
        show(sp_name, out[-1])
        save()


def show(sp_name: str, r: dict) -> None:
    t, lo, h, rf = r["table"], r["local"], r["heldout"], r["refine"]
    print(f"[{sp_name} {r['budget']}] chosen {r['assign']}")
    print(f"  true f(P) {t['joint']:.5f}; additive sum {t['additive']:.5f}; + pair terms {t['second_order']:.5f} "
          f"({len(t['pairs'])} pairs, {r['evals']['table']} policies, {r['wall_s']['interactions']:.1f} s with local)")
    for p in sorted(t["pairs"], key=lambda p: -abs(p["I"]))[:6]:
        print(f"    I({p['a']}, {p['b']}) = {p['I']:+.5f}  (f(a) {p['fa']:.5f}, f(b) {p['fb']:.5f}; {p['label']})")
    if lo is not None:
        big = sorted(lo["pairs"], key=lambda p: -abs(p["J"]))[:4]
        print(f"  local around P (one step down each, {r['evals']['local']} policies): f(P) {lo['f0']:.5f}, singles "
              + ", ".join(f"{n} {d:+.5f}" for n, d in lo["single"].items()))
        for p in big:
            print(f"    J({p['a']}, {p['b']}) = {p['J']:+.5f}  (steps {p['da']:+.5f}, {p['db']:+.5f}; {p['label']})")
    print(f"  refine: {rf['evals']} policies, {rf['rounds']} improving rounds ({rf['stopped']}), "
          f"in-sample {rf['start_true']:.5f} -> {rf['best_true']:.5f}; {r['refined_assign']}")
    tp = "-" if h["token_pruning"] is None else f"{h['token_pruning']:.5f} (keep {h['token_keep']})"
    print(f"  held-out: chosen {h['chosen']:.5f}, refined {h['refined']:.5f}, token pruning {tp}", flush=True)


def search_options(doc: str) -> argparse.ArgumentParser:
    """The options both issue-22 benchmarks share: models, data, the search's options, output."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--models", default="demo,demo-base")
    ap.add_argument("--data", default="shapes:val")
    ap.add_argument("--spaces", default="dop,multigroup")
    ap.add_argument("--kinds", default=None, help="op kinds of the multigroup space (default attn,mlp)")
    ap.add_argument("--budgets", default="tokens:1/9,tokens:2/9,tokens:1/3")
    ap.add_argument("--ranker", default="vispruner")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", metavar="PATH")
    return ap


def main(argv=None) -> None:
    ap = search_options(__doc__)
    ap.add_argument("--samples", type=int, default=25)
    ap.add_argument("--held-out", type=int, default=25)
    ap.add_argument("--refine-evals", type=int, default=32)
    ap.add_argument("--max-local-pairs", type=int, default=40, help="0: no local interactions")
    args = ap.parse_args(argv)
    args.budgets = args.budgets.split(",")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = {}
    for name in args.models.split(","):
        model, processor = load_model(name)
        samples = load_dataset(args.data, limit=args.samples + args.held_out)
        prepared = prepare_samples(model, processor, samples)
        held = Meter(model, prepared[args.samples:], args.ranker)
        for sp_name in args.spaces.split(","):
            print(f"== {name}, space {sp_name}", flush=True)
            results[f"{name}/{sp_name}"] = []
            one(model, processor, prepared[:args.samples], held, sp_name, args, results[f"{name}/{sp_name}"],
                lambda: save(args.json, args, results))
        print(f"== {name}: held-out policies measured {held.evals}", flush=True)
    print(f"wall time {time.perf_counter() - t0:.1f} s")
    save(args.json, args, results)


def save(path, args, results) -> None:
    """The results so far (after every budget: a long run keeps what it measured)."""
    if path:
        with open(path, "w") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
