"""Certified choice on held-out samples (issue 22): per model, space and budget, the chosen
policy's true first-token KL on samples the search never saw with 1 candidate (the proxy's
choice), with K and with the largest K measured, beside token pruning at the same FLOPs (same
ranker) and GSOP; the Spearman of the candidates' final ranking (true KL on the search
samples) against their held-out KL; and what the certified choice costs beside the table.

One search per model and space with ``--candidates`` the largest K: the K best by proxy are
a prefix of the larger list (docs/design.md, "Certified choice"), so the choice with fewer
candidates is the best of the first ones, and their held-out KL is measured once.

    python benchmarks/certified.py --model demo-base [--spaces dop,multigroup] [--samples 25] \\
        [--held-out 40] [--candidates 1,4,8,16] [--gsop] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time

from dop.evaluate.datasets import load_dataset
from dop.evaluate.loading import load_model, prompt_builder_for
from dop.pipeline import DEFAULT_BUDGETS
from dop.search import CostModel, Solver, methods, search
from dop.search.divergence import prepare_samples
from dop.search.kbest import k_best
from dop.search.robust import aggregate as aggregated
from dop.search.verify import SampleSet, sharded_true_divergence


def certified_rows(model, processor, val, held, space, ks, build_prompt, aggregate, verify, table=None) -> dict:
    kmax = max(ks)
    t0 = time.perf_counter()
    res = search(model, processor, val, budgets=list(DEFAULT_BUDGETS), space=space, ranker="vispruner",
                 candidates=kmax, aggregate=aggregate, verify_k=verify, verify_samples=held,
                 build_prompt=build_prompt, progress=False, table=table)
    wall = time.perf_counter() - t0
    per_eval = res.certify_s / max(1, res.certify_evaluations)
    out = {"table_s": res.table_s, "table_layer_evals": res.layer_evals, "certify_s": res.certify_s,
           "certify_evaluations": res.certify_evaluations, "certify_layer_evals": res.certify_layer_evals,
           "wall_s": wall, "budgets": {}}
    L, n = res.space.num_layers, res.table.num_samples
    for k in ks:  # what a search with k candidates would measure: the distinct policies of the first k per budget
        distinct = {json.dumps(c["policy"], sort_keys=True) for r in res.results if r.certified
                    for c in r.certified.candidates[:k]} if k > 1 else set()
        out.setdefault("cost", {})[k] = {
            "evaluations": len(distinct),
            # the batched replays of docs/design.md, "Certified choice": L * (2 + ceil(N / 8)) per sample
            "layer_evals": L * (2 + math.ceil(len(distinct) / 8)) * n if distinct else 0,
            "wall_s": len(distinct) * per_eval}
    for r in res.results:
        c = r.certified
        row = {"token_pruning": r.heldout.token_pruning["true"] if r.heldout.token_pruning else None,
               "token_pruning_in": r.verification.token_pruning["true"] if r.verification.token_pruning else None,
               "spearman_heldout": c.spearman_heldout, "spearman_proxy_heldout": c.spearman_proxy_heldout,
               "candidates": [{k: x[k] for k in ("params", "proxy", "true")} | {"heldout": h, "heldout_mean": aggregated(p)}
                              for x, h, p in zip(c.candidates, c.heldout, c.heldout_per_sample)]}
        for k in ks:
            first = c.candidates[:k]
            best = min(range(len(first)), key=lambda i: (first[i]["true"], i))
            row[f"k{k}"] = {"chosen": best + 1, "in_sample": first[best]["true"], "heldout": c.heldout[best],
                            "heldout_mean": row["candidates"][best]["heldout_mean"]}
        out["budgets"][r.budget.spec] = row
    return out


def gsop_rows(model, processor, val, held_set, build_prompt) -> dict:
    t0 = time.perf_counter()
    res = methods.search("gsop", model, processor, val, budgets=list(DEFAULT_BUDGETS), ranker="vispruner",
                         build_prompt=build_prompt, progress=False)
    held = held_set.divergences(model, [(r.policy, r.policy.ranker) for r in res.results])
    return {"wall_s": time.perf_counter() - t0, "evaluations": res.evaluations,
            "budgets": {r.budget.spec: {"in_sample": r.divergence, "heldout": h, "met": r.met}
                        for r, h in zip(res.results, held)}}


def measuring_timing(model, processor, val, build_prompt, k: int, repeats: int = 2) -> dict:
    """Wall time of measuring the ``k`` best ``dop`` policies at 2/9 on ``val``: one full
    forward per policy and sample, against the batched replay (SampleSet.measured), the two
    alternating in one process; and the largest difference of the divergences."""
    res = search(model, processor, val, budget="tokens:2/9", ranker="vispruner", candidates=1,
                 build_prompt=build_prompt, progress=False)
    sp = res.space
    cost = CostModel(model, res.shape["visual_tokens"], res.shape["text_tokens"], "paper")
    sols = k_best(Solver(sp, res.table.proxy(sp), cost), res.results[0].solution.limit, k)
    ss = SampleSet.of(model, prepare_samples(model, processor, val, build_prompt))
    policies = [(s.policy, "vispruner") for s in sols]
    times = {"full": [], "batched": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        full = [sharded_true_divergence(model, ss.prepared, ss.refs, p, r)[1] for p, r in policies]
        times["full"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        batched, calls = ss.measured(model, policies)
        times["batched"].append(time.perf_counter() - t0)
    diff = max(abs(a - b) for fa, fb in zip(full, batched) for a, b in zip(fa, fb))
    return {"policies": len(policies), "samples": len(val), "full_s": times["full"], "batched_s": times["batched"],
            "batched_layer_calls_per_sample": calls, "full_layer_calls_per_sample": len(policies) * sp.num_layers,
            "max_abs_difference": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo-base")
    ap.add_argument("--data", default="shapes:val")
    ap.add_argument("--spaces", default="dop,multigroup")
    ap.add_argument("--samples", type=int, default=25)
    ap.add_argument("--held-out", type=int, default=40)
    ap.add_argument("--candidates", default="1,4,8,16")
    ap.add_argument("--aggregate", default="mean")
    ap.add_argument("--verify", type=int, default=2, help="random policies of --verify (token pruning comes with it)")
    ap.add_argument("--gsop", action="store_true", help="also GSOP's policies on the held-out samples")
    ap.add_argument("--tables", help="folder to keep (and reuse) the divergence tables in")
    ap.add_argument("--timing", action="store_true",
                    help="only time full forwards against batched replays for measuring the candidates")
    ap.add_argument("--json")
    args = ap.parse_args()
    ks = sorted({int(k) for k in args.candidates.split(",")})
    model, processor = load_model(args.model)
    rows = load_dataset(args.data, limit=args.samples + args.held_out)
    val, held = rows[:args.samples], rows[args.samples:]
    build_prompt = prompt_builder_for(args.model)
    if args.timing:
        print(json.dumps(measuring_timing(model, processor, val, build_prompt, max(ks)), indent=1))
        return
    doc = {"model": args.model, "samples": len(val), "held_out": len(held), "aggregate": args.aggregate,
           "candidates": ks, "spaces": {}}
    for space in args.spaces.split(","):
        doc["spaces"][space] = certified_rows(model, processor, val, held, space, ks, build_prompt, args.aggregate,
                                              args.verify, args.tables and f"{args.tables}/table-{args.model}-{space}.json")
        print(json.dumps({space: doc["spaces"][space]["budgets"]}, indent=1), flush=True)
    if args.gsop:
        held_set = SampleSet.of(model, prepare_samples(model, processor, held, build_prompt))
        doc["gsop"] = gsop_rows(model, processor, val, held_set, build_prompt)
    print(json.dumps({k: v for k, v in doc.items() if k != "spaces"}, indent=1))
    for space, s in doc["spaces"].items():
        print(f"{space}: table {s['table_layer_evals']} layer calls, {s['table_s']:.1f} s; certified ({max(ks)}): "
              f"{s['certify_evaluations']} policies, {s['certify_layer_evals']} layer calls, {s['certify_s']:.1f} s")
        for spec, b in s["budgets"].items():
            print(f"  {spec}: " + ", ".join(f"K={k}: {b[f'k{k}']['heldout']:.4g}" for k in ks)
                  + f", token pruning {b['token_pruning']:.4g}, Spearman held-out {b['spearman_heldout']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=1)


if __name__ == "__main__":
    main()
