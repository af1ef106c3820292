"""`dop` as torchrun runs it (``torchrun ... -m dop ARGS``), with two switches for
tests/pipeline/test_distributed.py, both read from the environment:

- ``DOP_TEST_KILL=R:N``: rank R dies (``os._exit``, no clean-up) at its N-th new table entry;
- ``DOP_TEST_COUNT=DIR``: each rank writes the number of table entries it computed to
  ``DIR/rank<r>.txt``, and the number of eval samples it scored to ``DIR/rank<r>.scored``,
  when the command returns.

Either makes the divergence table checkpoint after every entry, so what a killed rank
leaves behind is exactly the entries before the fatal one.
"""

from __future__ import annotations

import os
import sys

import dop.evaluate.runner as runner
import dop.search.api as api
from dop.cli import main

RANK = int(os.environ.get("RANK", "0"))
KILL = os.environ.get("DOP_TEST_KILL")
COUNT = os.environ.get("DOP_TEST_COUNT")
computed = scored = 0


def on_entry(done: int) -> None:
    global computed
    computed = done
    if KILL:
        rank, n = map(int, KILL.split(":"))
        if rank == RANK and done == n:
            os._exit(17)


if KILL or COUNT:
    build_table = api.build_table

    def patched(*args, **kw):
        return build_table(*args, **kw, checkpoint_s=0.0, on_entry=on_entry)

    api.build_table = patched

if COUNT:
    vqa_accuracy = runner.vqa_accuracy

    def counted(*args, **kw):
        global scored
        scored += 1
        return vqa_accuracy(*args, **kw)

    runner.vqa_accuracy = counted

if __name__ == "__main__":
    rc = main(sys.argv[1:])
    if COUNT:
        with open(os.path.join(COUNT, f"rank{RANK}.txt"), "w") as fh:
            fh.write(str(computed))
        with open(os.path.join(COUNT, f"rank{RANK}.scored"), "w") as fh:
            fh.write(str(scored))
    sys.exit(rc)
