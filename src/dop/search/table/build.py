"""Filling (or finishing) a divergence table: in this process (:mod:`.filling`), or shared
among the ranks of a process group (:mod:`.sharding`)."""

from __future__ import annotations

import os
from typing import Callable, Sequence

from ... import distributed as dd
from ..divergence import PreparedSample
from ..spaces.base import Space
from .filling import VALUE_BATCH, fill
from .format import DivergenceTable
from .sharding import build_sharded


def build_table(
    model,
    prepared: Sequence[PreparedSample],
    space: Space,
    ranker,
    key: dict,
    *,
    table: DivergenceTable | None = None,
    path: str | None = None,
    naive: bool = False,
    progress: bool = True,
    checkpoint_s: float = 5.0,
    on_entry: Callable[[int], None] | None = None,
    batch_size: int = 1,
    value_batch: int = VALUE_BATCH,
) -> DivergenceTable:
    """Fill (or finish) the divergence table. ``path``: load it if present (resume), save as it
    fills. ``naive=True`` runs every entry as a full forward (for tests and comparisons).
    ``on_entry(n_done)`` is called after each new entry. ``batch_size`` samples run together
    (padded on the left); the entries equal batch size 1's and the layer counts are per sample.
    ``value_batch``: entries of one start layer computed together (one forward of
    ``batch_size * value_batch`` rows); the entries do not depend on it, the counts do.

    Under a process group of several ranks (:mod:`dop.distributed`) each rank fills the rows
    of its share of the samples and the rows are gathered on every rank (see
    :func:`_build_sharded`)."""

    n = len(prepared)
    if table is None and path and os.path.exists(path):
        table = DivergenceTable.load(path)
        table.check_key(key, f"table file {path!r}")
    if table is None:
        table = DivergenceTable.empty(key, space, n)
    else:
        table.check_key(key)
    table.sample_ids = [s.where for s in prepared]
    if dd.is_distributed():
        return build_sharded(model, prepared, space, ranker, key, table, path, naive, progress, checkpoint_s,
                              on_entry, batch_size, value_batch)
    bar = dd.JobProgress(table.total(), table.total() - table.missing(), desc="divergence table", unit="entry",
                         disable=not progress)
    fill(model, prepared, space, ranker, table, range(n), path, naive, bar, checkpoint_s, on_entry,
          batch_size=batch_size, value_batch=value_batch)
    return table
