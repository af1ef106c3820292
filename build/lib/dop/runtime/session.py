"""Per-prompt bookkeeping of the pruning runtime.

A :class:`PruneSession` lives as long as an `apply_policy` handle. A forward pre-hook on the
model's entry module (the one that receives `input_ids`) tells it what the new tokens of
each forward are; the wrapped decoder layers then ask it which rows each op kind processes.

Every token carries, per primitive op kind, a *depth*: it is processed by that op at layer
``l`` iff ``l < depth``. Text and generated tokens have depth ``num_layers``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from ..policy import OP_KINDS, Policy
from ..rankers import LayerState, RankContext, Ranker, check_permutation, run_ranker


@dataclass
class CacheRecord:
    """What we know of one KV cache object: logical positions of each layer's entries."""

    seen: int = 0  # tokens of the sequence so far (logical length)
    kv_pos: dict[int, torch.Tensor] = field(default_factory=dict)
    pruned: bool = False  # some layer holds fewer entries than `seen`


@dataclass
class ForwardState:
    """The new tokens of one forward call."""

    past: int  # logical position of the first new token
    n_new: int
    spans: list  # ImageSpan per image, positions relative to the new tokens
    inputs: dict
    record: CacheRecord | None
    depths: dict[str, torch.Tensor] | None = None  # kind -> (n_new,) int64
    ranks: list[torch.Tensor] | None = None
    rows_cache: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.positions = torch.arange(self.n_new)  # indices of the new tokens, built once per forward

    @property
    def has_visual(self) -> bool:
        return bool(self.spans)


PIXEL_KEYS = ("pixel_values", "pixel_values_videos", "image_embeds", "mm_encoder_outputs")


class _StopForward(Exception):
    def __init__(self, hidden):
        self.hidden = hidden


class PruneSession:
    def __init__(self, model, adapter, policy: Policy, ranker: Ranker):
        self.model = model
        self.adapter = adapter
        self.policy = policy
        self.ranker = ranker
        self.num_layers = adapter.num_layers
        self.current: ForwardState | None = None
        self.bypass = False
        self._records: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self._kind_depths = {k: torch.tensor(policy.kind_depths(k), dtype=torch.long) for k in OP_KINDS}
        self.unpruned = policy.is_unpruned()
        self.rerank_layers = tuple(sorted(set(int(l) for l in getattr(ranker, "layers", ()) or ())))
        if self.rerank_layers and not self.unpruned:
            first = self.rerank_layers[0]
            low = min(min(v) for v in policy_depths(policy).values())
            if low < first:
                raise ValueError(
                    f"ranker {ranker.name!r} ranks inside the LLM at layer {first}, so every visual "
                    f"token must stay active below it; the policy skips some op from layer {low}"
                )

    # ------------------------------------------------------------------ hook
    def pre_forward(self, module, args, kwargs):
        if self.bypass:
            self.current = None
            return None
        input_ids = kwargs.get("input_ids")
        if input_ids is None and args:
            input_ids = args[0]
        embeds = kwargs.get("inputs_embeds")
        if input_ids is None and embeds is None:
            self.current = None
            return None
        batch = (input_ids if input_ids is not None else embeds).shape[0]
        if batch != 1:
            raise ValueError(
                f"dop's runtime prunes one prompt at a time (batch size 1); got a batch of {batch}. "
                "Run the prompts one by one (batched pruning is planned)."
            )
        n_new = int((input_ids if input_ids is not None else embeds).shape[1])
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        record = self._record_for(cache)
        past = record.seen if record is not None else 0
        # visual tokens only where this forward carries images: a generated token that happens
        # to equal the image token id is text
        has_pixels = any(kwargs.get(k) is not None for k in PIXEL_KEYS)
        spans = self.adapter.image_spans(input_ids, kwargs) if input_ids is not None and has_pixels else []
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.bool().all()):
            raise ValueError("padding (attention_mask zeros) is not supported by the pruning runtime at batch size 1")
        self.current = ForwardState(past=past, n_new=n_new, spans=spans, inputs=dict(kwargs), record=record)
        if record is not None:
            record.seen = past + n_new
        return None

    def _record_for(self, cache) -> CacheRecord | None:
        if cache is None:
            return None
        rec = self._records.get(cache)
        if rec is None:
            rec = CacheRecord()
            existing = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
            rec.seen = existing
            self._records[cache] = rec
            if existing:  # entries written before the policy was applied: unpruned prefix
                for l in range(self.num_layers):
                    rec.kv_pos[l] = torch.arange(existing)
            _patch_seq_length(cache, rec)
        return rec

    # ------------------------------------------------------------------ ranking
    def needs_pruning(self, st: ForwardState) -> bool:
        return (st.has_visual and not self.unpruned) or (st.record is not None and st.record.pruned)

    def prepare(self, st: ForwardState, hidden: torch.Tensor) -> None:
        """Rank the images of this forward and derive every new token's depths."""
        n_keep = [self.policy.n_keep(s.n) for s in st.spans]
        if self.rerank_layers:  # decides inside the LLM: start in order of appearance
            ranks = [torch.arange(s.n) for s in st.spans]
        else:
            ctx = RankContext(self.model, self.adapter, st.inputs, st.spans, hidden, n_keep)
            ranks = run_ranker(self.ranker, ctx)
        st.ranks = ranks
        st.depths = self._depths_from_ranks(st, ranks)

    def _depths_from_ranks(self, st: ForwardState, ranks) -> dict[str, torch.Tensor]:
        depths = {k: torch.full((st.n_new,), self.num_layers, dtype=torch.long) for k in OP_KINDS}
        for span, perm in zip(st.spans, ranks):
            group = torch.tensor(self.policy.group_of_rank(span.n), dtype=torch.long)
            token_group = torch.empty_like(group)
            token_group[perm] = group  # token perm[r] sits at rank r
            pos = span.positions
            for k in OP_KINDS:
                depths[k][pos] = self._kind_depths[k][token_group]
        return depths

    def maybe_rerank(self, st: ForwardState, layer_idx: int, hidden, layer, position_embeddings, rotary_fn):
        if layer_idx not in self.rerank_layers or not st.has_visual or st.depths is None:
            return
        # a token may move iff every op processed it at every layer below this one: its state
        # is then that of an unpruned token, whichever group it joins from here on
        active, processed = [], []
        for span in st.spans:
            pos = span.positions
            act = torch.ones(span.n, dtype=torch.bool)
            here = torch.zeros(span.n, dtype=torch.bool)
            for k in OP_KINDS:
                act &= st.depths[k][pos] >= layer_idx
                here |= st.depths[k][pos] > layer_idx
            active.append(act)
            processed.append(int(here.sum()))
        # n_keep: per image, the visual tokens some op processes at this layer
        ctx = RankContext(self.model, self.adapter, st.inputs, st.spans, None, processed)
        state = LayerState(layer_idx, hidden, layer, position_embeddings, rotary_fn, active, st.ranks)
        new = self.ranker.rerank(ctx, state)
        if new is None:
            return
        checked = []
        for i, (perm, old, act, span) in enumerate(zip(new, st.ranks, active, st.spans)):
            perm = check_permutation(perm, span.n, f"ranker {self.ranker.name!r} at layer {layer_idx}, image {i}")
            frozen = ~act[old]  # rank slots holding tokens no longer active
            if bool((perm[frozen] != old[frozen]).any()):
                raise ValueError(
                    f"ranker {self.ranker.name!r} at layer {layer_idx} moved tokens that are no longer active"
                )
            checked.append(perm)
        st.ranks = checked
        st.depths = self._depths_from_ranks(st, checked)
        st.rows_cache.clear()

    # ------------------------------------------------------------------ rows per layer
    def rows(self, st: ForwardState, kind: str, layer_idx: int) -> torch.Tensor | None:
        """Indices (into the new tokens) that op ``kind`` processes at ``layer_idx``;
        None means all of them."""
        key = (kind, layer_idx)
        if key not in st.rows_cache:
            if st.depths is None:
                st.rows_cache[key] = None
            else:
                keep = st.depths[kind] > layer_idx
                st.rows_cache[key] = None if bool(keep.all()) else torch.nonzero(keep).flatten()
        return st.rows_cache[key]


def policy_depths(policy: Policy) -> dict[str, list[int]]:
    return {k: policy.kind_depths(k) for k in OP_KINDS}


def _patch_seq_length(cache, record: CacheRecord) -> None:
    """A pruned layer 0 holds fewer K/V entries than the sequence has tokens, yet generation
    derives the next position from ``cache.get_seq_length()``. Answer with the logical length."""
    original = cache.get_seq_length

    def get_seq_length(layer_idx: int = 0, *args, **kwargs):
        if record.pruned:
            return record.seen
        return original(layer_idx, *args, **kwargs)

    try:
        cache.get_seq_length = get_seq_length
    except (AttributeError, TypeError):  # a cache class with slots: leave it
        pass


def capture_decoder_input(model, adapter, inputs: dict) -> torch.Tensor:
    """Run the model up to its first decoder layer and return that layer's input."""
    layer0 = adapter.decoder_layers()[0]

    def stop(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        raise _StopForward(hidden)

    h = layer0.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    except _StopForward as s:
        return s.hidden
    finally:
        h.remove()
    raise RuntimeError("the model finished without reaching its first decoder layer")


def rank_prompt(model, adapter, ranker: Ranker, inputs: dict, n_keep=None) -> list[torch.Tensor]:
    """Rank the visual tokens of one prompt outside of a pruned forward."""
    input_ids = inputs["input_ids"]
    if input_ids.shape[0] != 1:
        raise ValueError(f"rank_visual_tokens takes one prompt (batch size 1), got {input_ids.shape[0]}")
    spans = adapter.image_spans(input_ids, inputs)
    if n_keep is None:
        keeps = [s.n for s in spans]
    elif isinstance(n_keep, int):
        keeps = [min(n_keep, s.n) for s in spans]
    else:
        keeps = list(n_keep)
    hidden = capture_decoder_input(model, adapter, inputs)
    ctx = RankContext(model, adapter, dict(inputs), spans, hidden, keeps)
    return run_ranker(ranker, ctx)
