"""Start-up of the `dop` command: wall time of a few light invocations, and the heavy packages
each loads, for one or more source trees in one run (docs/benchmarks.md, "Command start-up").

    python benchmarks/cli_startup.py                       # this tree
    python benchmarks/cli_startup.py OLD/src NEW/src       # two trees, ratios against the first

Each tree is put first on PYTHONPATH of a fresh interpreter; the trees are run alternately,
``--repeats`` times each, and the medians are compared, so a busy machine slows both alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HEAVY = ("torch", "transformers", "numpy", "PIL", "matplotlib", "scipy")
INVOCATIONS = {
    "dop --help": ["--help"],
    "dop transfer --help": ["transfer", "--help"],
    "dop flops --model llava-1.5-7b": ["flops", "--model", "llava-1.5-7b"],
}
# run the command in-process, then say which heavy packages it left loaded
PROBE = ("import sys, contextlib, io\n"
         "from dop.cli import main\n"
         "with contextlib.redirect_stdout(io.StringIO()):\n"
         "    try:\n"
         "        main(sys.argv[1:])\n"
         "    except SystemExit:\n"
         "        pass\n"
         f"print(','.join(m for m in {HEAVY!r} if m in sys.modules) or '-')\n")


def run_once(src: str, argv: list[str]) -> tuple[float, str]:
    env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], env=env, capture_output=True, text=True)
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{src}: dop {' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    return took, done.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="*", help="source folders holding the dop package (default: this tree's src)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per tree and invocation (default 5)")
    args = parser.parse_args()
    trees = args.trees or [str(Path(__file__).resolve().parents[1] / "src")]
    times = {(name, t): [] for name in INVOCATIONS for t in trees}
    loaded = {}
    for _ in range(args.repeats):
        for name, argv in INVOCATIONS.items():
            for t in trees:
                took, heavy = run_once(t, argv)
                times[(name, t)].append(took)
                loaded[(name, t)] = heavy
    for name in INVOCATIONS:
        first = statistics.median(times[(name, trees[0])])
        for t in trees:
            med = statistics.median(times[(name, t)])
            ratio = f"  {first / med:5.2f}x faster than the first" if t != trees[0] else ""
            print(f"{name:32s} {t:28s} median {med:6.2f} s  loads {loaded[(name, t)]}{ratio}")


if __name__ == "__main__":
    main()
