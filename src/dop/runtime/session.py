"""Per-forward bookkeeping of the pruning runtime (docs/design.md, "The runtime").

A :class:`PruneSession` lives as long as an `apply_policy` handle. A forward pre-hook on the
model's entry module (the one that receives `input_ids`) tells it what the new tokens of
each forward are; the patched decoder layers then ask it which rows each op kind processes.

Every new token carries, per primitive op kind, a *depth*: it is processed by that op at layer
``l`` iff ``l < depth``, and, for a policy with per-layer skips, its group's skips are taken
out (docs/design.md, "Per-layer skips"). Text and generated tokens have depth ``num_layers``;
padding tokens (``attention_mask == 0``) have depth 0 for every kind, so they are never
computed and never become keys. Batches are handled row by row in the bookkeeping and packed in the
computation: see :class:`RowSet`.

Every tensor made here follows the device of the inputs it describes.
"""

from __future__ import annotations

import bisect
import weakref
from dataclasses import dataclass, field

import torch

from .. import compat
from ..models import ImageSpan
from ..policy import OP_KINDS, Policy
from ..rankers import LayerState, RankContext, Ranker, check_permutation, run_ranker
from ..rankers.base import rerank_layers
from .cache import CacheRecord, attach, detach, record_of


@dataclass
class RowSet:
    """The rows one op kind processes at one layer, in two layouts.

    *packed*: ``flat`` indexes the (B * S) flattened new tokens, row-major and increasing; the
    projections and the MLP run on these rows only (FLOPs fall with the pruning).
    *padded*: ``index`` (B, M) gives each batch row's processed positions, left-aligned and
    padded to the longest row (M); ``valid`` (B, M) marks the real slots, and ``slots``
    indexes the real slots of the flattened (B * M) layout in the same order as ``flat``.
    Attention and the KV cache use the padded layout (a cache holds one tensor per layer).
    ``every`` is True when all B * S tokens are processed (then packed == padded == dense).
    """

    flat: torch.Tensor
    index: torch.Tensor
    valid: torch.Tensor
    slots: torch.Tensor
    every: bool

    @property
    def width(self) -> int:
        return int(self.index.shape[1])

    @property
    def count(self) -> int:
        return int(self.flat.numel())

    @classmethod
    def from_keep(cls, keep: torch.Tensor) -> "RowSet":
        B, S = keep.shape
        dev = keep.device
        counts = keep.sum(1)
        M = int(counts.max()) if B else 0
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :M]
        valid = torch.arange(M, device=dev)[None, :] < counts[:, None]
        return cls(
            flat=torch.nonzero(keep.reshape(-1)).flatten(),
            index=order,
            valid=valid,
            slots=torch.nonzero(valid.reshape(-1)).flatten(),
            every=bool(keep.all()),
        )


@dataclass
class ForwardState:
    """The new tokens of one forward call (a batch of B rows of S new tokens each)."""

    past: int  # column of the first new token
    batch: int
    n_new: int
    spans: list  # ImageSpan per image over the batch (row-major), positions within the new tokens
    inputs: dict
    record: CacheRecord | None
    present: torch.Tensor  # (B, S) bool: not padding
    device: torch.device
    depths: dict[str, torch.Tensor] | None = None  # kind -> (B, S) int64
    groups: torch.Tensor | None = None  # (B, S) int64: policy group of each visual token, -1 for the rest
    ranks: list[torch.Tensor] | None = None  # per span
    rows_cache: dict = field(default_factory=dict)
    compiled: bool = False  # traced by torch.compile: dense rows, columns read from the static cache
    segments: torch.Tensor | None = None  # (B, S) packed sequence of each token (padding-free inputs)

    def __post_init__(self) -> None:
        # built once per forward; a compiled forward reads its columns from the cache instead
        # (a Python int that changes every step would make the compiler recompile every step)
        if not self.compiled:
            self.columns = self.past + torch.arange(self.n_new, device=self.device)

    @property
    def has_visual(self) -> bool:
        return bool(self.spans)


PIXEL_KEYS = ("pixel_values", "pixel_values_videos", "image_embeds", "mm_encoder_outputs")


class PruneSession:
    def __init__(self, model, adapter, policy: Policy, ranker: Ranker):
        self.model = model
        self.adapter = adapter
        self.policy = policy
        self.ranker = ranker
        self.num_layers = adapter.num_layers
        self.current: ForwardState | None = None
        self.bypass = False
        self._caches: dict[int, weakref.ref] = {}  # the caches this session attached its record to
        self._kind_depths = {k: list(policy.kind_depths(k)) for k in OP_KINDS}
        # every depth a token can have, per kind (padding 0, text num_layers): the rows of
        # layers l and l' are the same set unless some such depth d has l < d <= l', or the
        # groups skipped at l and l' differ (per-layer skips: _skipped)
        self._bands = {k: sorted({0, self.num_layers, *v}) for k, v in self._kind_depths.items()}
        self._skipped = _skipped_groups(policy, self.num_layers) if policy.skip else None
        extents = {k: [_extent(d, sk) for d, sk in zip(self._kind_depths[k], policy.kind_skip(k))] for k in OP_KINDS}
        self._clean = {k: [e[0] for e in v] for k, v in extents.items()}
        self._last = {k: [e[1] for e in v] for k, v in extents.items()}
        self.unpruned = policy.is_unpruned()
        self.rerank_layers = rerank_layers(ranker)
        if self.rerank_layers and not self.unpruned:
            first = self.rerank_layers[0]
            low = policy.max_active_depth()
            if low < first:
                raise ValueError(
                    f"ranker {ranker.name!r} ranks inside the LLM at layer {first}, so every visual "
                    f"token must stay active below it; the policy skips some op at layer {low}"
                )

    # ------------------------------------------------------------------ hook
    def pre_forward(self, module, args, kwargs):
        # a policy that keeps every operation changes nothing: keep no state at all, so that
        # compiled graphs see no Python-side bookkeeping (docs/design.md, "Compile")
        if self.bypass or self.unpruned:
            self.current = None
            return None
        input_ids = kwargs.get("input_ids")
        if input_ids is None and args:
            input_ids = args[0]
        embeds = kwargs.get("inputs_embeds")
        if input_ids is None and embeds is None:
            self.current = None
            return None
        ref = input_ids if input_ids is not None else embeds
        batch, n_new = int(ref.shape[0]), int(ref.shape[1])
        device = ref.device
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if torch.compiler.is_compiling():
            return self._pre_compiled(cache, kwargs, batch, n_new, device)
        record = self._record_for(cache, kwargs.get("attention_mask"), device)
        past = record.seen if record is not None else 0
        # visual tokens only where this forward carries images: a generated token that happens
        # to equal the image token id is text
        has_pixels = any(_given(kwargs.get(k)) for k in PIXEL_KEYS)
        spans = []
        if has_pixels:
            lookup = (embeds, self.adapter.input_embeddings()) if input_ids is None else None
            spans = self.adapter.image_spans(input_ids, kwargs, embeddings_of=lookup)
        present = _present(kwargs.get("attention_mask"), batch, n_new, device)
        segments = _packed_segments(kwargs.get("position_ids"), batch, n_new) if past == 0 else None
        self.current = ForwardState(past=past, batch=batch, n_new=n_new, spans=spans, inputs=dict(kwargs),
                                    record=record, present=present, device=device, segments=segments)
        return None

    def post_forward(self, module, args, output):
        """The forward is done: the cache now holds its columns. Until then ``seen`` (and so
        the cache's logical length) is the length before it, as transformers expects while it
        builds positions and masks."""
        st = self.current
        if st is not None and st.record is not None and not st.compiled:
            st.record.seen = st.past + st.n_new
        return None

    def _pre_compiled(self, cache, kwargs, batch, n_new, device):
        """A forward traced by torch.compile (docs/design.md, "Compile"): decoding steps on a
        static cache whose prefill ran pruned. Only tensor state is touched here."""
        if any(_given(kwargs.get(k)) for k in PIXEL_KEYS):
            raise ValueError(
                "a pruned forward over images cannot be compiled (its row counts depend on the ranks); "
                "compile the decoding steps only, as generate() does with cache_implementation='static'"
            )
        record = record_of(cache)
        if record is not None and (record.owner != id(self) or not compat.is_static_cache(cache)):
            raise ValueError("a compiled forward under a pruning policy needs the static cache its pruned prefill filled")
        present = torch.ones((batch, n_new), dtype=torch.bool, device=device)
        self.current = ForwardState(past=0, batch=batch, n_new=n_new, spans=[], inputs={}, record=record,
                                    present=present, device=device, compiled=True)
        return None

    def _record_for(self, cache, mask, device) -> CacheRecord | None:
        if cache is None:
            return None
        rec = record_of(cache)
        if rec is None or rec.owner != id(self):
            rec = CacheRecord(owner=id(self))
            existing = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
            rec.seen = existing
            if existing:  # entries written before the policy was applied: every column, in order
                rows = compat.cache_batch_size(cache)
                cols = torch.arange(existing, device=device)[None, :].expand(rows, -1)
                if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] >= existing:
                    old = mask[:, :existing].to(device=device, dtype=torch.bool).expand(rows, -1)
                    cols = torch.where(old, cols, -1)
                    rec.pruned = not bool(old.all())
                for l in range(self.num_layers):
                    rec.kv_pos[l] = cols
            attach(cache, rec)
            self._caches[id(cache)] = weakref.ref(cache)
        return rec

    def release_caches(self) -> None:
        """Restore every cache this session attached its record to (those still alive)."""
        for ref in self._caches.values():
            cache = ref()
            if cache is not None:
                detach(cache, id(self))
        self._caches.clear()

    # ------------------------------------------------------------------ ranking
    def needs_pruning(self, st: ForwardState) -> bool:
        if st.record is not None and st.record.pruned:
            return True
        return st.has_visual and not self.unpruned

    def prepare(self, st: ForwardState, hidden: torch.Tensor) -> None:
        """Rank the images of this forward and derive every new token's depths."""
        n_keep = [self.policy.n_keep(s.n) for s in st.spans]
        if self.rerank_layers:  # decides inside the LLM: start in order of appearance
            ranks = [torch.arange(s.n, device=st.device) for s in st.spans]
        else:
            ctx = RankContext(self.model, self.adapter, st.inputs, st.spans, hidden, n_keep, present=st.present)
            ranks = run_ranker(self.ranker, ctx)
        self.assign_ranks(st, [r.to(st.device) for r in ranks])

    def assign_ranks(self, st: ForwardState, ranks) -> None:
        """Set the ranks of every image of ``st`` and derive each new token's group and depths."""
        dev = st.device
        full = torch.full((st.batch, st.n_new), self.num_layers, dtype=torch.long, device=dev)
        full = torch.where(st.present, full, 0)  # padding: never processed
        depths = {k: full.clone() for k in OP_KINDS}
        groups = torch.full((st.batch, st.n_new), -1, dtype=torch.long, device=dev)
        per_group = {k: torch.tensor(self._kind_depths[k], dtype=torch.long, device=dev) for k in OP_KINDS}
        for span, perm in zip(st.spans, ranks):
            group = torch.tensor(self.policy.group_of_rank(span.n), dtype=torch.long, device=dev)
            token_group = torch.empty_like(group)
            token_group[perm] = group  # token perm[r] sits at rank r
            pos = span.positions.to(dev)
            groups[span.row, pos] = token_group
            for k in OP_KINDS:
                depths[k][span.row, pos] = per_group[k][token_group]
        st.ranks, st.depths, st.groups = list(ranks), depths, groups
        st.rows_cache.clear()

    def maybe_rerank(self, st: ForwardState, layer_idx: int, hidden, parts, position_embeddings):
        """In-LLM rankers decide per prompt: each batch row is shown to them without its padding."""
        if layer_idx not in self.rerank_layers or not st.has_visual or st.depths is None:
            return
        new_ranks, changed = list(st.ranks), False
        for row in sorted({s.row for s in st.spans}):
            idx = [i for i, s in enumerate(st.spans) if s.row == row]
            perms = self._rerank_row(st, _RowView(st, row), idx, layer_idx, hidden, parts, position_embeddings)
            if perms is not None:
                changed = True
                for i, p in zip(idx, perms):
                    new_ranks[i] = p
        if changed:
            self.assign_ranks(st, new_ranks)

    def _rerank_row(self, st, view, idx, layer_idx, hidden, parts, position_embeddings):
        spans = [st.spans[i] for i in idx]
        ranks = [st.ranks[i] for i in idx]
        # a token may move iff every op processed it at every layer below this one: its state
        # is then that of an unpruned token, whichever group it joins from here on (a per-layer
        # skip below this layer freezes the token in its group, as a depth below it does)
        active, processed = [], []
        clean, last = ({k: torch.tensor(v, dtype=torch.long, device=st.device) for k, v in table.items()}
                       for table in (self._clean, self._last))
        for span in spans:
            pos = span.positions.to(st.device)
            token_group = st.groups[span.row, pos]
            act = torch.ones(span.n, dtype=torch.bool, device=st.device)
            here = torch.zeros(span.n, dtype=torch.bool, device=st.device)
            for k in OP_KINDS:
                act &= clean[k][token_group] >= layer_idx
                here |= last[k][token_group] >= layer_idx
            active.append(act)
            processed.append(int(here.sum()))
        # n_keep: per image, the visual tokens some op processes at this layer or a later one
        ctx = RankContext(self.model, self.adapter, st.inputs, [view.span(s) for s in spans], None, processed)
        pe = tuple(view.take(t) for t in position_embeddings) if position_embeddings is not None else None
        state = LayerState(layer_idx, view.take(hidden), parts, pe, active, ranks)
        new = self.ranker.rerank(ctx, state)
        if new is None:
            return None
        checked = []
        for i, (perm, old, act, span) in enumerate(zip(new, ranks, active, spans)):
            perm = check_permutation(perm, span.n, f"ranker {self.ranker.name!r} at layer {layer_idx}, image {i}")
            perm = perm.to(st.device)
            frozen = ~act[old]  # rank slots holding tokens no longer active
            if bool((perm[frozen] != old[frozen]).any()):
                raise ValueError(
                    f"ranker {self.ranker.name!r} at layer {layer_idx} moved tokens that are no longer active"
                )
            checked.append(perm)
        return checked

    # ------------------------------------------------------------------ rows per layer
    def rows(self, st: ForwardState, kind: str, layer_idx: int) -> RowSet:
        """The rows op ``kind`` processes at ``layer_idx``, built once per band of layers that
        process the same rows (a handful per forward, not one per layer: fewer host syncs)."""
        if st.depths is None:
            key = (kind, None)
        else:
            skipped = self._skipped[kind][layer_idx] if self._skipped is not None else None
            key = (kind, bisect.bisect_right(self._bands[kind], layer_idx), skipped)
        if key not in st.rows_cache:
            st.rows_cache[key] = RowSet.from_keep(self._keep(st, kind, layer_idx))
        return st.rows_cache[key]

    def _keep(self, st: ForwardState, kind: str, layer_idx: int) -> torch.Tensor:
        """(B, S) bool: the new tokens op ``kind`` processes at ``layer_idx``."""
        if st.depths is None:
            return st.present
        keep = st.depths[kind] > layer_idx
        skipped = self._skipped[kind][layer_idx] if self._skipped is not None else ()
        if skipped:
            keep &= ~torch.isin(st.groups, torch.tensor(skipped, dtype=torch.long, device=st.device))
        return keep


class _RowView:
    """One batch row without its padding: what a per-prompt in-LLM ranker expects to see."""

    def __init__(self, st: ForwardState, row: int):
        self.row = row
        self.keep = torch.nonzero(st.present[row]).flatten()
        self.new_pos = torch.cumsum(st.present[row].long(), 0) - 1

    def take(self, t: torch.Tensor) -> torch.Tensor:
        src = t[self.row:self.row + 1] if t.shape[0] > 1 else t
        return src.index_select(1, self.keep.to(src.device))

    def span(self, s: ImageSpan) -> ImageSpan:
        return ImageSpan(self.new_pos[s.positions.to(self.new_pos.device)], s.grid, row=0, index=s.index)


def _packed_segments(position_ids, batch: int, n_new: int) -> torch.Tensor | None:
    """(B, S) index of the packed sequence each token belongs to, for padding-free inputs whose
    position ids restart within a row (a token at position 0, in every position dimension, that
    is not the row's first starts a new sequence); None for ordinary inputs. Tokens of different
    packed sequences never see each other (docs/design.md, "Batches")."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.shape[-1] != n_new or n_new < 2:
        return None
    p = position_ids if position_ids.dim() == 3 else position_ids[None]
    start = (p == 0).all(0)  # (B or 1, S)
    start[:, 0] = False
    if not bool(start.any()):
        return None
    return torch.cumsum(start.long(), dim=1).expand(batch, n_new)


def _given(value) -> bool:
    """A pixel input that carries something (generate passes an empty dict of encoder outputs)."""
    if value is None:
        return False
    if isinstance(value, (dict, list, tuple)):
        return len(value) > 0
    return True


def _present(mask, batch: int, n_new: int, device) -> torch.Tensor:
    """(B, S) bool: the new tokens that are not padding, from a 2-D attention mask."""
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] >= n_new:
        return mask[:, -n_new:].to(device=device, dtype=torch.bool).expand(batch, n_new)
    return torch.ones((batch, n_new), dtype=torch.bool, device=device)


def _extent(depth: int, skipped: tuple[int, ...]) -> tuple[int, int]:
    """For one kind and group: the layer below which every layer processes the group, and the
    last layer that processes it (-1: none); ``depth`` and ``depth - 1`` without skips."""
    last = next((l for l in range(depth - 1, -1, -1) if l not in skipped), -1)
    return min([depth, *skipped]), last


def _skipped_groups(policy: Policy, num_layers: int) -> dict[str, list[tuple[int, ...]]]:
    """Per kind and layer, the groups a per-layer skip takes out there (docs/design.md,
    "Per-layer skips"); built once per applied policy, for policies that have skips."""
    out = {}
    for k in OP_KINDS:
        per_layer = [[] for _ in range(num_layers)]
        for g, layers in enumerate(policy.kind_skip(k)):
            for l in layers:
                per_layer[l].append(g)
        out[k] = [tuple(gs) for gs in per_layer]
    return out
