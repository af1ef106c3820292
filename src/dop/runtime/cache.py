"""dop's record on a KV cache object, and the cache methods it wraps to follow it
(docs/design.md, "KV cache").

A pruned layer holds fewer entries than the sequence has columns, so dop keeps, on the cache
object itself, a :class:`CacheRecord` (where a traced forward can reach it) and wraps a few of
the cache's methods on that instance: the lengths answer the logical sequence, and the
record's rows follow the cache's batch rows (beam search, assisted decoding).

The wrapping is undone exactly: :func:`attach` keeps the cache's own methods (whatever its
instance held before, or nothing) and always wraps those, never another session's wrappers;
:func:`detach` puts them back. A cache that a second session takes over (its record replaced)
is restored by that session, so removing two handles in either order leaves it as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import compat

RECORD = "_dop_record"  # the CacheRecord on the cache object
ORIGINALS = "_dop_originals"  # name -> what the instance held before the wrapping (MISSING: nothing)
MISSING = object()


@dataclass
class CacheRecord:
    """What we know of one KV cache object.

    ``seen`` counts the columns of the (padded) sequence so far; ``kv_pos[l]`` (B, T_l) holds
    the column of each entry of layer ``l``'s cache, -1 for a slot that holds no token (a
    padding slot of the padded layout, or a hole of a static cache)."""

    seen: int = 0
    kv_pos: dict[int, torch.Tensor] = field(default_factory=dict)
    pruned: bool = False  # some layer's entries differ from "every column, in order"
    owner: int = 0  # id() of the session that made it


def record_of(cache) -> CacheRecord | None:
    """The record dop keeps on ``cache`` (None if it keeps none)."""
    return getattr(cache, RECORD, None) if cache is not None else None


def attach(cache, record: CacheRecord) -> None:
    """Keep ``record`` on ``cache`` and wrap the cache's methods to follow it, replacing any
    record and wrappers another session left there. ValueError when the cache takes no
    attributes."""
    _restore(cache)
    try:
        setattr(cache, RECORD, record)
    except (AttributeError, TypeError):
        raise ValueError(f"dop cannot keep its records on a {type(cache).__name__}") from None
    wrappers = _wrappers(cache, record)
    originals = {}
    for name, fn in wrappers.items():
        before = cache.__dict__.get(name, MISSING)
        try:
            setattr(cache, name, fn)
        except (AttributeError, TypeError):  # a method that cannot be set on the instance: leave it
            continue
        originals[name] = before
    setattr(cache, ORIGINALS, originals)


def detach(cache, owner: int) -> None:
    """Undo :func:`attach` when ``cache``'s record is ``owner``'s: its methods as they were, no
    record. A cache another session has taken over since is that session's to restore."""
    record = record_of(cache)
    if record is None or record.owner != owner:
        return
    _restore(cache)
    delattr(cache, RECORD)


def _restore(cache) -> None:
    originals = cache.__dict__.pop(ORIGINALS, None) if hasattr(cache, "__dict__") else None
    for name, before in (originals or {}).items():
        if before is MISSING:
            cache.__dict__.pop(name, None)
        else:
            setattr(cache, name, before)


def _wrappers(cache, record: CacheRecord) -> dict[str, Callable]:
    """The cache's methods taught about pruned layers:

    - a pruned layer 0 holds fewer K/V entries than the sequence has columns, yet generation
      derives the next position from ``cache.get_seq_length()``: answer the logical length;
    - beam search reorders the cache's batch rows: reorder our per-row entry columns with it.
    """
    patches = {}
    if not compat.is_static_cache(cache):  # a static cache counts every column itself
        original_len = cache.get_seq_length

        def get_seq_length(layer_idx: int = 0, *args, **kwargs):
            if record.pruned:
                return record.seen
            return original_len(layer_idx, *args, **kwargs)

        patches["get_seq_length"] = get_seq_length
        original_sizes = cache.get_mask_sizes

        def get_mask_sizes(query_length, layer_idx=0, *args, **kwargs):
            if record.pruned:  # the model's own mask is sized to the logical sequence (dop ignores it)
                return record.seen + int(query_length), 0
            return original_sizes(query_length, layer_idx, *args, **kwargs)

        patches["get_mask_sizes"] = get_mask_sizes

    def rows(fn):  # the record's per-row entry columns follow the cache's batch rows
        def apply(*args, **kwargs):
            for l, pos in list(record.kv_pos.items()):
                record.kv_pos[l] = fn(pos, *args, **kwargs)

        return apply

    def crop(pos, n):  # n < 0: the last -n tokens go (generated tokens: stored at every layer)
        return pos[:, :n] if n < 0 else pos

    follow = {
        "reorder_cache": rows(lambda pos, idx: pos.index_select(0, idx.to(pos.device))),
        "batch_select_indices": rows(lambda pos, idx: pos[idx.to(pos.device)]),
        "batch_repeat_interleave": rows(lambda pos, n: pos.repeat_interleave(n, dim=0)),
        "crop": rows(crop),
    }
    for name, update in follow.items():
        original = getattr(cache, name, None)
        if original is None:
            continue

        def patched(*args, _original=original, _update=update, _name=name, **kwargs):
            if _name == "crop" and args and int(args[0]) < 0:
                record.seen += int(args[0])
            _update(*args, **kwargs)
            return _original(*args, **kwargs)

        patches[name] = patched
    return patches
