"""Filling the divergence table (additive proxy) in one process.

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
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from ...batching import collated
from ...models import get_adapter
from ...rankers import resolve_ranker
from ...rankers.base import ranks_settled_at, rerank_layers
from ...runtime import apply_policy
from ...runtime.replay import batch_last_logits, capture_prefix, capture_ranks
from ..candidates import candidate_depths, mlp_token_layers, replay_candidates
from ..divergence import kl_divergence
from ..spaces.base import Param, Space
from .format import is_int

VALUE_BATCH = 8  # table entries of one start layer per batched forward (docs/design.md, "Table cost")


def layer_evals_per_sample(space: Space, ranker=None, value_batch: int = VALUE_BATCH) -> tuple[int, int]:
    """Decoder-layer calls the table spends on one sample computed from scratch, and the naive
    count (every entry a full forward): exactly what :func:`build_table` adds up, so the cost
    of a search can be priced before it runs (docs/scaling.md). A call over a batch of
    ``value_batch`` candidates counts once (its work: ``token_layers``)."""
    L = space.num_layers
    entries = [(p, v) for p in space.params for v in p.measured]
    chunks = entry_chunks(entries, value_batch, first_replay(ranker, L))
    probe = probe_layers(L, ranker) if any(s > 0 for s, _ in chunks) else 0
    return L + probe + sum(L - s for s, _ in chunks), L + L * len(entries)


def entry_chunks(entries: Sequence[tuple[Param, int]], value_batch: int,
                 first_replay: int = 0) -> list[tuple[int, list[tuple[Param, int]]]]:
    """Table entries ``(param, value)`` grouped by the first layer they change, in order of
    first appearance, cut into runs of ``value_batch``: ``[(start, entries), ...]``, one
    batched forward each. An entry that starts below ``first_replay`` (every one for the
    naive table; those a ranker re-ranks for at or after their start) is a full forward of
    its own: start 0, alone."""
    if not is_int(value_batch) or value_batch < 1:
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


def first_replay(ranker, num_layers: int, naive: bool = False) -> int:
    """The lowest start layer a batched replay can serve: past every re-ranking layer of
    ``ranker`` (the replay sets the ranks; docs/design.md, "Table cost")."""
    layers = rerank_layers(resolved(ranker))
    return num_layers if naive else (max(layers) + 1 if layers else 0)


def probe_layers(L: int, ranker) -> int:
    """Layers run once per sample to capture the ranking (up to the ranker's last re-ranking layer)."""
    return ranks_settled_at(resolved(ranker), L)


def fill(model, prepared, space, ranker, table, indices, path, naive, bar, checkpoint_s, on_entry,
          close: bool = True, batch_size: int = 1, value_batch: int = VALUE_BATCH) -> None:
    """Compute the missing entries of samples ``indices`` into ``table``, saving it to
    ``path`` every ``checkpoint_s`` seconds and at the end (also on error)."""

    if not is_int(batch_size) or batch_size < 1:
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
        self.first_replay = first_replay(ranker, self.L, naive)  # entries starting below it: full forwards

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
            probe = probe_layers(L, self.ranker)
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


def resolved(ranker):
    return resolve_ranker(ranker)
