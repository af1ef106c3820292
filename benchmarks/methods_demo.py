"""The comparison methods on the demo (docs/methods.md, "On the demo"): each method's policy at
each budget, its in-sample first-token KL, its FLOPs, and the search's wall time and layer
evaluations, on ``shapes:val`` (25 samples, as ``dop run`` searches).

    OMP_NUM_THREADS=1 python benchmarks/methods_demo.py [--methods vtw,shortv,gsop] [--samples 25] [--batch-size 1]
"""

from __future__ import annotations

import argparse

import torch

from dop.evaluate.datasets import load_dataset
from dop.evaluate.loading import load_model
from dop.search.methods import search


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="vtw,shortv,gsop")
    ap.add_argument("--samples", type=int, default=25)
    ap.add_argument("--budgets", default="tokens:16,tokens:32,tokens:48")
    ap.add_argument("--ranker", default="vispruner", help="GSOP's ranker (VTW and ShortV use none)")
    ap.add_argument("--gsop-groups", default=None, help="GSOP's rank groups, e.g. 0.125,0.25,0.5,1.0")
    ap.add_argument("--gsop-block", type=int, default=None, help="GSOP's layers per operation")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=1, help="prompts per forward while measuring KL")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = load_model("demo")
    samples = load_dataset("shapes:val", limit=args.samples)
    budgets = args.budgets.split(",")
    print(f"demo, shapes:val x {args.samples}, {args.threads} thread(s)")
    print(f"{'method':7} {'budget':10} {'KL':>9} {'paper':>6} {'dop':>6}  params")
    for name in args.methods.split(","):
        kw = {"ranker": args.ranker} if name == "gsop" else {}
        if name == "gsop" and args.gsop_groups:
            kw["groups"] = [float(x) for x in args.gsop_groups.split(",")]
        if name == "gsop" and args.gsop_block:
            kw["block"] = args.gsop_block
        kw["batch_size"] = args.batch_size
        res = search(name, model, processor, samples, budgets=budgets, progress=False, **kw)
        for r in res.results:
            params = {k: v for k, v in r.policy.meta["params"].items() if v is not None}
            print(f"{name:7} {r.budget.spec:10} {r.divergence:9.5f} {r.flops['paper']['fraction']:6.3f} "
                  f"{r.flops['dop']['fraction']:6.3f}  {params}{'  NOTE ' + r.note if r.note else ''}")
        print(f"{name:7} search {res.wall_s:.1f} s, {res.evaluations} policies measured, "
              f"{res.layer_evals} layer evaluations (naive {res.naive_layer_evals})")


if __name__ == "__main__":
    main()
