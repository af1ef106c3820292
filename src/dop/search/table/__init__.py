"""The divergence table (docs/design.md, "Search", "Table cost"): its file format
(:mod:`.format`), filling it in one process (:mod:`.filling`) or among ranks
(:mod:`.sharding`), and :func:`build_table`, which picks one (:mod:`.build`)."""

from __future__ import annotations

from .build import build_table
from .filling import VALUE_BATCH, entry_chunks, layer_evals_per_sample
from .format import COUNTERS, FORMAT, DivergenceTable, TableError, samples_fingerprint
from .sharding import rank_path

__all__ = ["COUNTERS", "FORMAT", "VALUE_BATCH", "DivergenceTable", "TableError", "build_table", "entry_chunks",
           "layer_evals_per_sample", "rank_path", "samples_fingerprint"]
