"""The divergence table (additive proxy): per parameter and measured value, the divergence of
the policy with that parameter alone changed, per validation sample.

Cost saving (docs/design.md, "Table cost"): a change that starts at layer ``d`` leaves layers
``< d`` equal to the unpruned run, so per sample the unpruned layer inputs are cached once
(:func:`dop.runtime.replay.capture_prefix`) and each entry runs layers ``d..L-1`` only; the
entries that start at the same layer (every ``n_v`` value; ``D_attn`` and ``D_mlp`` at one
depth) run together, ``value_batch`` at a time, as the rows of one batched forward
(:mod:`dop.search.candidates`). Counted per sample: ``layer_evals`` are decoder-layer calls
(one call over a batch of candidates counts once), against ``naive_layer_evals`` (every entry
a full forward, plus one unpruned forward); ``token_layers`` are the token rows the MLP
processed summed over the layers of every candidate, against ``naive_token_layers`` (every
entry a full forward of the whole prompt): batching lowers the first, not the second.

The table is checkpointed as it fills (JSON, temporary file + rename, per-sample values so a
resumed run recomputes nothing and reproduces the same numbers); a file made for another
search (model, samples, ranker, space, grid) is refused, naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .. import distributed as dd
from ..batching import collate, pad_token_id
from ..jsonio import write_json_atomic
from ..models import get_adapter
from ..rankers import resolve_ranker
from ..rankers.base import ranks_settled_at, rerank_layers
from ..runtime import apply_policy
from ..runtime.replay import batch_last_logits, capture_prefix, capture_ranks
from .candidates import candidate_depths, mlp_token_layers, replay_candidates
from .divergence import PreparedSample, kl_divergence
from .spaces import Param, Space

FORMAT = "dop-search-table/1"
VALUE_BATCH = 8  # table entries of one start layer per batched forward (docs/design.md, "Table cost")
COUNTERS = ("layer_evals", "naive_layer_evals", "token_layers", "naive_token_layers")


class TableError(ValueError):
    """A table file is unreadable or belongs to another search."""


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def samples_fingerprint(prepared: Sequence[PreparedSample]) -> str:
    h = hashlib.sha1()
    for s in prepared:
        h.update(s.inputs["input_ids"].numpy().tobytes())
        for k in sorted(s.inputs):
            v = s.inputs[k]
            if k != "input_ids" and isinstance(v, torch.Tensor):
                h.update(k.encode())
                h.update(v.detach().float().cpu().numpy().round(4).tobytes())
    return h.hexdigest()[:16]


@dataclass
class DivergenceTable:
    key: dict
    num_samples: int
    entries: dict[str, dict[int, list]] = field(default_factory=dict)  # param -> value -> per-sample KL
    layer_evals: int = 0  # decoder-layer calls, per sample
    naive_layer_evals: int = 0
    token_layers: int = 0  # token rows through the MLP, summed over layers and candidates
    naive_token_layers: int = 0
    wall_s: float = 0.0

    @classmethod
    def empty(cls, key: dict, space: Space, num_samples: int) -> "DivergenceTable":
        t = cls(key, num_samples)
        t.entries = {p.name: {v: [None] * num_samples for v in p.measured} for p in space.params}
        return t

    # -- content ---------------------------------------------------------------------
    def get(self, name: str, value: int, sample: int):
        return self.entries[name][value][sample]

    def set(self, name: str, value: int, sample: int, kl: float) -> None:
        self.entries[name][value][sample] = float(kl)

    def merge_values(self, other: "DivergenceTable") -> None:
        """Fill this table's missing entries from ``other`` (a table of the same search)."""
        for name, vals in other.entries.items():
            for v, per in vals.items():
                mine = self.entries[name][v]
                for i, x in enumerate(per):
                    if mine[i] is None and x is not None:
                        mine[i] = x

    def missing(self) -> int:
        return sum(x is None for vals in self.entries.values() for per in vals.values() for x in per)

    def total(self) -> int:
        return sum(len(per) for vals in self.entries.values() for per in vals.values())

    @property
    def complete(self) -> bool:
        return self.missing() == 0

    def means(self, name: str) -> dict[int, float]:
        out = {}
        for v, per in self.entries[name].items():
            if any(x is None for x in per):
                raise TableError(f"table entry {name}={v} is incomplete")
            out[v] = sum(per) / len(per)
        return out

    def proxy(self, space: Space) -> dict[str, dict[int, float]]:
        """Proxy divergence of every candidate value of every parameter (interpolated)."""
        return {p.name: p.interpolate(self.means(p.name)) for p in space.params}

    # -- files -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "key": self.key,
            "num_samples": self.num_samples,
            "entries": {n: {str(v): per for v, per in vals.items()} for n, vals in self.entries.items()},
            **{name: getattr(self, name) for name in COUNTERS},
            "wall_s": self.wall_s,
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "table") -> "DivergenceTable":
        """Check every field's type (a hand-edited or foreign file fails here, naming the
        field, never later inside the solver)."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise TableError(f"{where}: not a {FORMAT} file")
        for name in ("key", "num_samples", "entries"):
            if name not in d:
                raise TableError(f"{where}: missing field {name!r}")
        key, n, raw = d["key"], d["num_samples"], d["entries"]
        if not isinstance(key, dict):
            raise TableError(f"{where}: 'key' must be an object, got {type(key).__name__}")
        if not _is_int(n) or n < 1:
            raise TableError(f"{where}: 'num_samples' must be a positive integer, got {n!r}")
        if not isinstance(raw, dict):
            raise TableError(f"{where}: 'entries' must be an object, got {type(raw).__name__}")
        entries: dict[str, dict[int, list]] = {}
        for name, vals in raw.items():
            if not isinstance(vals, dict):
                raise TableError(f"{where}: entries.{name} must be an object of value -> per-sample list")
            entries[name] = {}
            for v, per in vals.items():
                try:
                    iv = int(v)
                except ValueError:
                    raise TableError(f"{where}: entries.{name}: value {v!r} is not an integer") from None
                if not isinstance(per, list) or len(per) != n:
                    raise TableError(f"{where}: entries.{name}.{v} must be a list of {n} per-sample "
                                     f"divergences, got {per!r}"[:300])
                for i, x in enumerate(per):
                    if x is not None and not (_is_number(x) and x >= -1e-3):
                        raise TableError(f"{where}: entries.{name}.{v}[{i}] must be a divergence (a number >= 0) "
                                         f"or null, got {x!r}")
                entries[name][iv] = list(per)
        measured = key.get("measured")
        if isinstance(measured, dict):
            want = {str(p): sorted(int(v) for v in vs) for p, vs in measured.items()
                    if isinstance(vs, list) and all(_is_int(v) for v in vs)}
            have = {p: sorted(vals) for p, vals in entries.items()}
            if want != have:
                raise TableError(f"{where}: the entries do not match the measured grid of its key "
                                 f"(key: {sorted(want)}, entries: {sorted(have)})")
        counters = {}
        for name, kind in (*((c, int) for c in COUNTERS), ("wall_s", float)):
            x = d.get(name, 0)
            if not _is_number(x) or x < 0:
                raise TableError(f"{where}: {name!r} must be a non-negative number, got {x!r}")
            counters[name] = kind(x)
        return cls(key, n, entries, **counters)

    def save(self, path: str) -> None:
        write_json_atomic(path, self.to_dict(), indent=1)

    @classmethod
    def load(cls, path: str) -> "DivergenceTable":
        where = f"table file {path!r}"
        try:
            with open(path, "rb") as fh:
                data = json.loads(fh.read().decode("utf-8"))
        except UnicodeDecodeError:
            raise TableError(f"{where}: not UTF-8 JSON text") from None
        except json.JSONDecodeError as e:
            raise TableError(f"{where}: not valid JSON ({e.msg}, line {e.lineno})") from None
        except RecursionError:
            raise TableError(f"{where}: JSON nested too deeply") from None
        except IsADirectoryError:
            raise TableError(f"{where}: is a folder") from None
        return cls.from_dict(data, where)

    def check_key(self, key: dict, where: str = "table") -> None:
        diff = sorted(k for k in set(key) | set(self.key) if key.get(k) != self.key.get(k))
        if diff:
            shown = "; ".join(f"{k}: file has {self.key.get(k)!r}, this search {key.get(k)!r}" for k in diff[:4])
            raise TableError(f"{where} was made for another search ({shown}); use another --table path or delete it")


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
    if dd.is_distributed():
        return _build_sharded(model, prepared, space, ranker, key, table, path, naive, progress, checkpoint_s,
                              on_entry, batch_size, value_batch)
    bar = dd.JobProgress(table.total(), table.total() - table.missing(), desc="divergence table", unit="entry",
                         disable=not progress)
    _fill(model, prepared, space, ranker, table, range(n), path, naive, bar, checkpoint_s, on_entry,
          batch_size=batch_size, value_batch=value_batch)
    return table


def layer_evals_per_sample(space: Space, ranker=None, value_batch: int = VALUE_BATCH) -> tuple[int, int]:
    """Decoder-layer calls the table spends on one sample computed from scratch, and the naive
    count (every entry a full forward): exactly what :func:`build_table` adds up, so the cost
    of a search can be priced before it runs (docs/scaling.md). A call over a batch of
    ``value_batch`` candidates counts once (its work: ``token_layers``)."""
    L = space.num_layers
    entries = [(p, v) for p in space.params for v in p.measured]
    chunks = entry_chunks(entries, value_batch, _first_replay(ranker, L))
    probe = _probe_layers(L, ranker) if any(s > 0 for s, _ in chunks) else 0
    return L + probe + sum(L - s for s, _ in chunks), L + L * len(entries)


def entry_chunks(entries: Sequence[tuple[Param, int]], value_batch: int,
                 first_replay: int = 0) -> list[tuple[int, list[tuple[Param, int]]]]:
    """Table entries ``(param, value)`` grouped by the first layer they change, in order of
    first appearance, cut into runs of ``value_batch``: ``[(start, entries), ...]``, one
    batched forward each. An entry that starts below ``first_replay`` (every one for the
    naive table; those a ranker re-ranks for at or after their start) is a full forward of
    its own: start 0, alone."""
    if not _is_int(value_batch) or value_batch < 1:
        raise ValueError(f"value_batch must be a positive integer, got {value_batch!r}")
    by_start: dict[int, list] = {}
    full = []
    for p, v in entries:
        start = p.start_layer(v)
        if start < first_replay:
            full.append((0, [(p, v)]))
        else:
            by_start.setdefault(start, []).append((p, v))
    return full + [(s, group[i:i + value_batch]) for s, group in by_start.items()
                   for i in range(0, len(group), value_batch)]


def _first_replay(ranker, num_layers: int, naive: bool = False) -> int:
    """The lowest start layer a batched replay can serve: past every re-ranking layer of
    ``ranker`` (the replay sets the ranks; docs/design.md, "Table cost")."""
    layers = rerank_layers(_resolved(ranker))
    return num_layers if naive else (max(layers) + 1 if layers else 0)


def _probe_layers(L: int, ranker) -> int:
    """Layers run once per sample to capture the ranking (up to the ranker's last re-ranking layer)."""
    return ranks_settled_at(_resolved(ranker), L)


def rank_path(path: str, rank: int) -> str:
    """The checkpoint of one rank's rows beside the table file: ``table.rank<r>.json``."""
    root, ext = os.path.splitext(path)
    return f"{root}.rank{rank}{ext or '.json'}"


def _build_sharded(model, prepared, space, ranker, key, base, path, naive, progress, checkpoint_s, on_entry,
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
    for r, other in _rank_files(path).items() if path else ():  # other ranks' files on this disk
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
        _fill(model, prepared, space, ranker, own, dd.shard(n), own_path, naive, bar, checkpoint_s, on_entry,
              close=False, batch_size=batch_size, value_batch=value_batch)
        bar.wait(missing)
    finally:
        bar.close()
    names = (*COUNTERS, "wall_s")
    parts = dd.all_gather((own.entries, [getattr(own, c) for c in names], [getattr(base, c) for c in names]))
    table = DivergenceTable(key, n, own.entries)
    for entries, *_ in parts:
        table.merge_values(DivergenceTable(key, n, entries))
    for i, c in enumerate(COUNTERS):  # work adds up over the ranks; what the table file held, once
        setattr(table, c, max(p[2][i] for p in parts) + sum(p[1][i] for p in parts))
    table.wall_s = max(p[2][-1] for p in parts) + max(p[1][-1] for p in parts)
    if path and dd.is_main():
        table.save(path)
    dd.barrier()  # the table file is written: the rank files are no longer needed
    for f in _rank_files(path).values() if path else ():  # every one this machine sees, stale ones too
        try:
            os.remove(f)
        except FileNotFoundError:  # another rank on this file system was first
            pass
    return table


def _rank_files(path: str) -> dict[int, str]:
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


def collated(model, prompts: Sequence[dict]) -> dict:
    """Prompts padded on the left into one batch, with the position ids of padded rows for
    families that need them (docs/design.md, "Batches")."""
    inputs = collate(list(prompts), pad_token_id(model))
    if len(prompts) > 1:
        pos = get_adapter(model).padded_position_ids(inputs["attention_mask"])
        if pos is not None:
            inputs["position_ids"] = pos
    return inputs


def _fill(model, prepared, space, ranker, table, indices, path, naive, bar, checkpoint_s, on_entry,
          close: bool = True, batch_size: int = 1, value_batch: int = VALUE_BATCH) -> None:
    """Compute the missing entries of samples ``indices`` into ``table``, saving it to
    ``path`` every ``checkpoint_s`` seconds and at the end (also on error)."""

    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
    entry_chunks([], value_batch)  # checks value_batch before any work
    filling = _Filling(model, prepared, space, ranker, table, path, naive, bar, checkpoint_s, on_entry, value_batch)
    indices = list(indices)
    try:
        with torch.inference_mode():
            for first in range(0, len(indices), batch_size):
                filling.sample_batch(indices[first:first + batch_size])
    finally:
        if close:
            bar.close()
        filling.stop()


class _Filling:
    """The state of one :func:`_fill` run: the model work per batch of samples and the
    bookkeeping of the table (counters, progress, checkpoints)."""

    def __init__(self, model, prepared, space, ranker, table, path, naive, bar, checkpoint_s, on_entry, value_batch):
        self.model, self.prepared, self.space, self.ranker = model, prepared, space, ranker
        self.table, self.path, self.naive, self.bar = table, path, naive, bar
        self.checkpoint_s, self.on_entry, self.value_batch = checkpoint_s, on_entry, value_batch
        self.adapter = get_adapter(model)
        self.L = self.adapter.num_layers
        self.t0 = self.last_save = time.perf_counter()
        self.wall0, self.done = table.wall_s, 0
        self.first_replay = _first_replay(ranker, self.L, naive)  # entries starting below it: full forwards

    def sample_batch(self, rows: list[int]) -> None:
        """Every missing entry of the samples ``rows``, run as one padded batch."""
        t, L = self.table, self.L
        # the chunks of every entry, whatever is missing: a resumed run batches each entry as
        # the first run did, so it reproduces the same numbers
        entries = [(p, v) for p in self.space.params for v in p.measured]
        chunks = [(start, chunk) for start, chunk in entry_chunks(entries, self.value_batch, self.first_replay)
                  if any(t.get(p.name, v, i) is None for p, v in chunk for i in rows)]
        if not chunks:
            return
        inputs = collated(self.model, [self.prepared[i].inputs for i in rows])
        prefix = capture_prefix(self.model, inputs)
        tokens = [int(x) for x in inputs["attention_mask"].sum(1)] if "attention_mask" in inputs \
            else [int(inputs["input_ids"].shape[1])] * len(rows)
        self._count(L * len(rows), L * len(rows), L * sum(tokens), L * sum(tokens))
        ranks = None
        if any(start > 0 for start, _ in chunks):
            ranks = capture_ranks(self.model, inputs, self.ranker)
            probe = _probe_layers(L, self.ranker)
            self._count(probe * len(rows), 0, probe * sum(tokens), 0)
        for start, chunk in chunks:
            logits = self._chunk(inputs, prefix, ranks, start, chunk, len(rows), sum(tokens))
            for (p, v), q in zip(chunk, logits):
                self._record(p.name, v, rows, prefix.logits, q, sum(tokens))

    def _chunk(self, inputs, prefix, ranks, start, chunk, n_rows, n_tokens) -> torch.Tensor:
        """(entries, rows, vocab) logits of the entries ``chunk`` that change layers ``start..``."""
        policies = [self.space.single(p.name, v) for p, v in chunk]
        if start < self.first_replay:  # a full forward (entry_chunks gives it alone, at start 0)
            with apply_policy(self.model, policies[0], ranker=self.ranker):
                q = batch_last_logits(self.model, inputs)[None]
            self._count(self.L * n_rows, 0, self.L * n_tokens, 0)
            return q
        states = [candidate_depths(self.model, prefix, pol, self.ranker, ranks, start) for pol in policies]
        with apply_policy(self.model, policies[0], ranker=self.ranker) as h:
            q = replay_candidates(h, prefix, states, start)
        self._count((self.L - start) * n_rows, 0, mlp_token_layers(states, start, self.L), 0)
        return q

    def _record(self, name, value, rows, reference, q, n_tokens) -> None:
        t = self.table
        for row, i in enumerate(rows):
            if t.get(name, value, i) is not None:
                continue  # measured before a resume
            t.set(name, value, i, kl_divergence(reference[row], q[row]))
            self.done += 1
            self.bar.update(1)
            if self.on_entry is not None:
                self.on_entry(self.done)
        self._count(0, self.L * len(rows), 0, self.L * n_tokens)
        if self.path and time.perf_counter() - self.last_save > self.checkpoint_s:
            self._save()

    def _count(self, calls: int, naive_calls: int, token_layers: int, naive_token_layers: int) -> None:
        t = self.table
        t.layer_evals += calls
        t.naive_layer_evals += naive_calls
        t.token_layers += token_layers
        t.naive_token_layers += naive_token_layers

    def _save(self) -> None:
        self.table.wall_s = self.wall0 + time.perf_counter() - self.t0
        self.table.save(self.path)
        self.last_save = time.perf_counter()

    def stop(self) -> None:
        self.table.wall_s = self.wall0 + time.perf_counter() - self.t0
        if self.path:
            self.table.save(self.path)


def _resolved(ranker):
    return resolve_ranker(ranker)
