"""The pruned decoder layer: gather the rows an op processes, compute, scatter-add back
(docs/design.md, "The runtime").

The decoder layer object itself stays in the model: :func:`patch_layer` only sets its
instance ``forward`` (as accelerate's hooks do), so parameter names, ``state_dict()``,
``save_pretrained`` and tensor-parallel plans see the unmodified model; :func:`unpatch_layer`
restores what was there before.

The layer's pieces (norms, q/k/v/o projections, MLP, the family's rotary function) are
reached through the family adapter's :class:`~dop.models.LayerParts`, never by attribute
(docs/design.md, "Model families"). Projections and the MLP run on the packed kept rows of
the whole batch; attention runs per batch row on the padded layout
(:mod:`dop.runtime.attention`); RoPE through the family's own rotary function on the gathered
cos/sin rows.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import compat
from ..models import LayerParts
from .attention import attend, visible
from .session import ForwardState, PruneSession, RowSet


class PrunedForward:
    """The instance ``forward`` of one decoder layer while a policy is applied."""

    def __init__(self, layer: nn.Module, layer_idx: int, session: PruneSession):
        self.layer = layer
        self.layer_idx = layer_idx
        self.session = session
        self.parts = session.adapter.layer_parts(layer_idx)
        self.previous = layer.__dict__.get("forward")  # an instance forward already set (accelerate hooks)
        self.original = self.previous if self.previous is not None else type(layer).forward.__get__(layer)

    def __call__(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                 position_embeddings=None, **kwargs):
        s = self.session
        st = s.current
        if st is None or s.bypass or not s.needs_pruning(st):
            if "past_key_values" not in kwargs:
                kwargs["cache"] = cache
            return self.original(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=use_cache, position_embeddings=s.adapter.layer_rope(position_embeddings),
                                 **kwargs)
        position_embeddings = s.adapter.token_rope(position_embeddings)  # one cos/sin row per token
        if "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        if tuple(hidden_states.shape[:2]) != (st.batch, st.n_new):
            raise RuntimeError(
                f"layer {self.layer_idx}: got hidden states of shape {tuple(hidden_states.shape[:2])}, "
                f"expected (batch, new tokens) = {(st.batch, st.n_new)}"
            )
        if st.compiled:
            return self._compute_compiled(st, hidden_states, position_embeddings, cache)
        if self.layer_idx == 0 and st.depths is None and st.has_visual:
            s.prepare(st, hidden_states)
        s.maybe_rerank(st, self.layer_idx, hidden_states, self.parts, position_embeddings)
        return self._compute(st, hidden_states, position_embeddings, cache)

    # ------------------------------------------------------------------ the computation
    def _compute(self, st: ForwardState, h, position_embeddings, cache):
        s, l, parts = self.session, self.layer_idx, self.parts
        B, S, _ = h.shape
        rq, rkv, rm = (_on(s.rows(st, k, l), h.device) for k in ("attn_q", "attn_kv", "mlp"))
        cols = st.columns.to(h.device)[None, :].expand(B, -1)
        cos, sin = (t.to(h.device).expand(B, -1, -1) for t in position_embeddings)

        # -- keys/values of the rows that keep attn_kv at this layer
        hn_kv = parts.attention_input(_rows(h, rkv))
        k = _heads(_padded(parts.keys(hn_kv), rkv, B), parts.head_dim)
        v = _heads(_padded(parts.values(hn_kv), rkv, B), parts.head_dim)
        _, k = parts.rotary(k, k, _gather(cos, rkv), _gather(sin, rkv))
        kv_pos = torch.where(rkv.valid, _gather(cols, rkv), -1)
        fresh = True  # the keys are exactly this forward's kept rows
        if cache is not None:
            k, v, kv_pos, fresh = _store(cache, st, l, k, v, kv_pos, rkv)

        # maps reported for output_attentions span every column, or a static cache's every slot
        columns = k.shape[2] if cache is not None and compat.is_static_cache_layer(cache, l) else st.past + S
        maps = parts.attentions_requested()
        # -- queries of the rows that keep attn_q (no key at all in this layer: no query sees one)
        if (not rq.count or not k.shape[2]) and maps:
            parts.report_attention(h, h.new_zeros((B, parts.num_heads, S, columns)))
        if rq.count and k.shape[2]:
            same = fresh and st.segments is None and _same(rq, rkv)
            hn_q = hn_kv if same else parts.attention_input(_rows(h, rq))
            q = _heads(_padded(parts.queries(hn_q), rq, B), parts.head_dim)
            q, _ = parts.rotary(q, q, _gather(cos, rq), _gather(sin, rq))
            q_pos = torch.where(rq.valid, _gather(cols, rq), -1)
            segments = None
            if st.segments is not None and fresh:  # packed sequences: keys of the query's own only
                seg = st.segments.to(h.device)
                segments = (_gather(seg, rq), _gather(seg, rkv))
            if maps:
                out, meaningful = _attend_with_map(parts, h, q, k, v, q_pos, kv_pos, rq, columns, segments)
            else:
                out, meaningful = attend(parts, q, k, v, q_pos=q_pos, kv_pos=kv_pos, same_rows=same,
                                         counts=rq.valid.sum(1), segments=segments)
            h = _add_rows(h, rq, out, meaningful, parts.attention_output)

        # -- MLP on its rows
        if rm.count:
            h = _scatter_add(h, rm.flat, parts.mlp_update(_rows(h, rm)), rm.every)
        return h

    def _compute_compiled(self, st: ForwardState, h, position_embeddings, cache):
        """A decoding step traced by torch.compile (docs/design.md, "Compile"): every new token is
        text, so every row is computed; the static cache's holes stay hidden by the mask. Only
        tensor operations, no value read back to Python."""
        l, parts = self.layer_idx, self.parts
        B, S, _ = h.shape
        cos, sin = (t.to(h.device).expand(B, -1, -1) for t in position_embeddings)
        hn = parts.attention_input(h)
        q = _heads(parts.queries(hn), parts.head_dim)
        k = _heads(parts.keys(hn), parts.head_dim)
        v = _heads(parts.values(hn), parts.head_dim)
        q, k = parts.rotary(q, k, cos, sin)
        cols = compat.static_cache_length(cache, l) + torch.arange(S, device=h.device)
        keys, values = cache.update(k, v, l)
        kv_pos = st.record.kv_pos[l]
        kv_pos.index_copy_(1, cols, cols[None, :].expand(B, -1).contiguous())
        q_pos = cols[None, :].expand(B, -1)
        out, meaningful = attend(parts, q, keys, values, q_pos=q_pos, kv_pos=kv_pos, same_rows=False, counts=None)
        h = h + parts.attention_output(out) * meaningful[..., None].to(h.dtype)
        return h + parts.mlp_update(h)


def _attend_with_map(parts: LayerParts, h, q, k, v, q_pos, kv_pos, rq: RowSet, columns: int, segments):
    """Attention computed through the map the model reports (``output_attentions=True``), laid
    out as the unpruned model's (B, heads, new tokens, columns): a kept query's row holds its
    softmax over the keys it may see; rows of skipped queries and columns of keys the layer
    does not hold are zero (docs/design.md, "Hidden states and attentions"). The output is
    computed from that very map, so gradients reach it as they reach an eager model's."""

    B, H, Mq, hd = q.shape
    rep = H // k.shape[1]
    kk, vv = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    allowed = visible(q_pos, kv_pos, parts.sliding_window)
    if segments is not None:
        allowed &= segments[0][:, :, None] == segments[1][:, None, :]
    seen = allowed.any(-1)
    scores = (q @ kk.transpose(-1, -2)) * parts.scaling
    probs = torch.softmax(scores.float().masked_fill(~allowed[:, None], float("-inf")), dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0).to(q.dtype)
    column = kv_pos.clamp(min=0)[:, None, None, :].expand(-1, H, Mq, -1)
    per_query = probs.new_zeros((B, H, Mq, columns)).scatter_add(3, column, probs * allowed[:, None])
    row = rq.index[:, None, :, None].expand(-1, H, -1, columns)
    weights = probs.new_zeros((B, H, h.shape[1], columns)).scatter(2, row, per_query)
    parts.report_attention(h, weights)
    back = weights.gather(2, row).gather(3, column) * allowed[:, None]  # the map, read back per key slot
    out = (back @ vv).transpose(1, 2).reshape(B, Mq, H * hd)
    return out, (q_pos >= 0) & seen


def _on(rows: RowSet, device) -> RowSet:
    if rows.flat.device == device:
        return rows
    return RowSet(rows.flat.to(device), rows.index.to(device), rows.valid.to(device), rows.slots.to(device), rows.every)


def _rows(x: torch.Tensor, rows: RowSet) -> torch.Tensor:
    """The kept rows of ``x`` (B, S, D): ``x`` itself when every row is kept, else packed (1, T, D)."""
    if rows.every:
        return x
    return x.reshape(-1, x.shape[-1]).index_select(0, rows.flat)[None]


def _padded(y: torch.Tensor, rows: RowSet, B: int) -> torch.Tensor:
    """Packed rows (1, T, D) into the padded layout (B, M, D), zeros in the padding slots."""
    if rows.every:
        return y
    out = y.new_zeros((B * rows.width, y.shape[-1]))
    out.index_copy_(0, rows.slots, y[0])
    return out.view(B, rows.width, y.shape[-1])


def _gather(t: torch.Tensor, rows: RowSet) -> torch.Tensor:
    """Per-token values ``t`` (B, S) or (B, S, D) at the padded layout's positions."""
    if rows.every:
        return t
    if t.dim() == 2:
        return torch.gather(t, 1, rows.index)
    return torch.gather(t, 1, rows.index[..., None].expand(-1, -1, t.shape[-1]))


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    B, M, D = x.shape
    return x.view(B, M, D // head_dim, head_dim).transpose(1, 2)


def _same(a: RowSet, b: RowSet) -> bool:
    return a is b or (a.count == b.count and bool(torch.equal(a.flat, b.flat)))


def _scatter_add(h: torch.Tensor, flat: torch.Tensor, update: torch.Tensor, dense: bool) -> torch.Tensor:
    if dense:
        return h + update.view(h.shape)
    B, S, d = h.shape
    return h.reshape(B * S, d).index_add(0, flat, update.reshape(-1, d)).view(B, S, d)


def _add_rows(h, rq: RowSet, out, meaningful, project):
    """The output projection (``project``) of the attention output of the query rows that saw
    some key, added to ``h``."""
    B = h.shape[0]
    ok = meaningful.reshape(-1).index_select(0, rq.slots) if not rq.every else meaningful.reshape(-1)
    if rq.every and bool(ok.all()):
        return h + project(out)
    packed = out.reshape(B * rq.width, -1).index_select(0, rq.slots)
    flat = rq.flat
    if not bool(ok.all()):
        packed, flat = packed[ok], flat[ok]
        if flat.numel() == 0:
            return h
    return _scatter_add(h, flat, project(packed[None]), False)


def _store(cache, st: ForwardState, l: int, k, v, kv_pos, rkv: RowSet):
    """Write this forward's kept keys/values to the cache; return every key of the layer, their
    columns, and whether the keys are exactly this forward's kept rows (no older entries).

    A dynamic cache stores the kept rows only (padded per batch row). A static cache is sized
    to the logical sequence: it receives every column, zeros where the row was skipped, and
    the columns record those slots as holes (-1) so no query ever sees them."""
    record = st.record
    if compat.is_static_cache_layer(cache, l):
        B, H, _, hd = k.shape
        S = st.n_new
        full_k, full_v = k.new_zeros((B, H, S, hd)), v.new_zeros((B, H, S, hd))
        if rkv.width:
            idx = rkv.index[:, None, :, None].expand(-1, H, -1, hd)
            full_k.scatter_(2, idx, k)
            full_v.scatter_(2, idx, v)
        keys, values = cache.update(full_k, full_v, l)
        pos = record.kv_pos.get(l)
        if pos is None or pos.shape != (B, keys.shape[2]):
            pos = torch.full((B, keys.shape[2]), -1, dtype=torch.long, device=k.device)
        written = torch.full((B, S), -1, dtype=torch.long, device=k.device)
        if rkv.width:
            written.scatter_(1, rkv.index, torch.where(rkv.valid, kv_pos, -1))
        pos = pos.clone()
        pos[:, st.past:st.past + S] = written
        record.kv_pos[l] = pos
        record.pruned = True
        return keys, values, pos, False
    prev = record.kv_pos.get(l) if record is not None else None
    keys, values = cache.update(k, v, l)
    if prev is not None and prev.shape[0] != kv_pos.shape[0]:
        prev = prev.expand(kv_pos.shape[0], -1)
    pos = kv_pos if prev is None else torch.cat([prev.to(kv_pos.device), kv_pos], dim=1)
    if record is not None:
        record.kv_pos[l] = pos
        if pos.shape[1] < st.past + st.n_new or bool((pos < 0).any()):
            record.pruned = True
    return keys, values, pos, prev is None or prev.shape[1] == 0


def patch_layer(layer: nn.Module, layer_idx: int, session: PruneSession) -> PrunedForward:
    if isinstance(layer.__dict__.get("forward"), PrunedForward):
        raise ValueError("a policy is already applied to this model; remove() it first")
    fwd = PrunedForward(layer, layer_idx, session)
    layer.forward = fwd
    return fwd


def unpatch_layer(layer: nn.Module) -> None:
    fwd = layer.__dict__.get("forward")
    if not isinstance(fwd, PrunedForward):
        return
    if fwd.previous is not None:
        layer.forward = fwd.previous
    else:
        del layer.forward


def is_patched(layer: nn.Module) -> bool:
    return isinstance(layer.__dict__.get("forward"), PrunedForward)
