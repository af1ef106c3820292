"""Divergence-table wall time with 1 and with 2 processes on this machine, one thread each,
as a ratio measured in one run (docs/scaling.md).

Each round runs the same `dop search` twice, interleaved so that load drifts hit both alike:
once as one plain process (``--threads 1``), once under ``torchrun --standalone
--nproc_per_node 2`` (``OMP_NUM_THREADS=1``), and reads the time of the table (``table_s``
of ``--json``, rank 0's, gathers included; loading the model is not in it). The ratio of
each round is taken, and the median over rounds is printed. It needs a quiet machine with
at least two free cores: on a busy one the two processes share fewer cores than that.

    python benchmarks/scaling.py [--samples 8] [--rounds 3] [--model demo] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

import torch


def search_args(args, out: str) -> list[str]:
    return ["search", "--model", args.model, "--data", args.data, "--samples", str(args.samples),
            "--budget", "0.25", "--ranker", args.ranker, "--no-progress", "-o", os.path.join(out, "p.json"),
            "--json", os.path.join(out, "s.json")]


def run_once(args, nproc: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as out:
        if nproc == 1:
            cmd = [sys.executable, "-m", "dop", *search_args(args, out), "--threads", "1"]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                   "-m", "dop", *search_args(args, out)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
        with open(os.path.join(out, "s.json")) as fh:
            doc = json.load(fh)
    return {"table_s": doc["table_s"], "wall_s": doc["wall_s"], "layer_evals": doc["layer_evals"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--data", default="shapes:val")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--ranker", default="vispruner")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    runs = {1: [], 2: []}
    for _ in range(args.rounds):
        for nproc in (1, 2):
            runs[nproc].append(run_once(args, nproc))
    one = [r["table_s"] for r in runs[1]]
    two = [r["table_s"] for r in runs[2]]
    ratios = [a / b for a, b in zip(one, two)]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    res = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "model": args.model, "data": args.data, "samples": args.samples, "ranker": args.ranker,
        "table_s_1": one, "table_s_2": two, "ratio_per_round": ratios, "speedup": statistics.median(ratios),
        "layer_evals": [runs[1][0]["layer_evals"], runs[2][0]["layer_evals"]], "loadavg_after": load,
    }
    print(f"divergence table, {args.model} on {args.data} ({args.samples} samples, ranker {args.ranker}), "
          f"one thread per process, {res['machine']}")
    print(f"  1 process:   {', '.join(f'{t:.2f}' for t in one)} s")
    print(f"  2 processes: {', '.join(f'{t:.2f}' for t in two)} s")
    print(f"  speedup (1-process time / 2-process time, median of {args.rounds} paired rounds): "
          f"{res['speedup']:.2f}x   (rounds: {', '.join(f'{r:.2f}' for r in ratios)})")
    print(f"  layer evaluations: {res['layer_evals'][0]} in one process, {res['layer_evals'][1]} over two")
    if load:
        print(f"  load average after the run: {load[0]:.2f} (1 min)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return res


if __name__ == "__main__":
    main()
