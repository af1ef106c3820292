"""Throughput of `dop eval --batch-size N` on the bundled demo: samples per second of the
pruned and unpruned passes at batch size 1 and N, measured in one run (passes interleaved,
best of --rounds), and the predictions checked equal.

    python benchmarks/eval_batching.py [--samples 48] [--batch-size 8] [--rounds 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform

import torch

import dop
from dop.demo import build_prompt, load_demo
from dop.demo.shapes import make_samples
from dop.evaluate import evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = load_demo()
    samples = make_samples("val", args.samples, seed=11)
    policy = dop.Policy(8, [0.25, 1.0], {"attn": [8, 3], "mlp": [8, 2]}, ranker="vispruner")
    best: dict = {}
    preds: dict = {}
    for _ in range(args.rounds):
        for bs in (1, args.batch_size):
            for name, pol in (("pruned", policy), ("unpruned", None)):
                r = evaluate(model, processor, samples, policy=pol, run_baseline=False, progress=False,
                             build_prompt=build_prompt, time_prefill=False, batch_size=bs)
                rate = len(samples) / r.wall_s
                best[name, bs] = max(best.get((name, bs), 0.0), rate)
                preds[name, bs] = [s.prediction for s in r.samples]
    print(f"demo, {args.samples} samples, {args.threads} thread(s), {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}; best of {args.rounds} rounds")
    print(f"{'pass':10s} {'batch 1':>12s} {f'batch {args.batch_size}':>12s} {'ratio':>7s}  same predictions")
    for name in ("pruned", "unpruned"):
        a, b = best[name, 1], best[name, args.batch_size]
        same = preds[name, 1] == preds[name, args.batch_size]
        print(f"{name:10s} {a:9.2f}/s {b:9.2f}/s {b / a:6.2f}x  {same}")


if __name__ == "__main__":
    main()
