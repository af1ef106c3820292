"""The divergence table of several ranks (issue 14; :mod:`dop.distributed`): each rank fills
its share of the samples and checkpoints it in its own file beside the table file."""

from __future__ import annotations

import os
import re

from ... import distributed as dd
from .filling import VALUE_BATCH, fill
from .format import COUNTERS, DivergenceTable


def rank_path(path: str, rank: int) -> str:
    """The checkpoint of one rank's rows beside the table file: ``table.rank<r>.json``."""
    root, ext = os.path.splitext(path)
    return f"{root}.rank{rank}{ext or '.json'}"


def build_sharded(model, prepared, space, ranker, key, base, path, naive, progress, checkpoint_s, on_entry,
                   batch_size=1, value_batch=VALUE_BATCH):
    """The table of several ranks (issue 14). Rank r computes the missing entries of samples
    r, r+W, ... and checkpoints them in its own file (:func:`rank_path`), which holds every
    value the rank knows and the model work that rank did; at the start the ranks pool what
    the table file and the rank files they see hold (so a resumed job, even with ranks placed
    on other nodes or another number of them, or a finished table on rank 0's disk only,
    costs nothing twice), at the end the rows are gathered on every rank and rank 0 writes the
    table file and the rank files are removed. Per-sample values do not depend on which
    rank computed them, so the table equals one process's; layer evaluations add up over
    the ranks (each counts what its own file records), wall time is the slowest rank's."""

    n = len(prepared)
    own_path = rank_path(path, dd.rank()) if path else None
    own = DivergenceTable.empty(key, space, n)
    if own_path and os.path.exists(own_path):
        own = DivergenceTable.load(own_path)
        own.check_key(key, f"table file {own_path!r}")
    own.merge_values(base)
    for r, other in rank_files(path).items() if path else ():  # other ranks' files on this disk
        if r != dd.rank():
            t = DivergenceTable.load(other)
            t.check_key(key, f"table file {other!r}")
            own.merge_values(t)
    for entries in dd.all_gather(own.entries):
        own.merge_values(DivergenceTable(key, n, entries))
    missing = own.missing()
    bar = dd.JobProgress(own.total(), own.total() - missing, desc="divergence table", unit="entry",
                         disable=not progress)
    try:
        fill(model, prepared, space, ranker, own, dd.shard(n), own_path, naive, bar, checkpoint_s, on_entry,
              close=False, batch_size=batch_size, value_batch=value_batch)
        bar.wait(missing)
    finally:
        bar.close()
    names = (*COUNTERS, "wall_s")
    parts = dd.all_gather((own.entries, [getattr(own, c) for c in names], [getattr(base, c) for c in names]))
    table = DivergenceTable(key, n, own.entries, sample_ids=base.sample_ids)
    for entries, *_ in parts:
        table.merge_values(DivergenceTable(key, n, entries))
    for i, c in enumerate(COUNTERS):  # work adds up over the ranks; what the table file held, once
        setattr(table, c, max(p[2][i] for p in parts) + sum(p[1][i] for p in parts))
    table.wall_s = max(p[2][-1] for p in parts) + max(p[1][-1] for p in parts)
    if path and dd.is_main():
        table.save(path)
    dd.barrier()  # the table file is written: the rank files are no longer needed
    for f in rank_files(path).values() if path else ():  # every one this machine sees, stale ones too
        try:
            os.remove(f)
        except FileNotFoundError:  # another rank on this file system was first
            pass
    return table


def rank_files(path: str) -> dict[int, str]:
    """The rank files of the table file ``path`` that this machine sees, by rank."""
    folder = os.path.dirname(os.path.abspath(path))
    root, ext = os.path.splitext(os.path.basename(path))
    pattern = re.compile(re.escape(root) + r"\.rank([0-9]+)" + re.escape(ext or ".json"))
    found = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
        m = pattern.fullmatch(name)
        if m:
            found[int(m.group(1))] = os.path.join(folder, name)
    return found
