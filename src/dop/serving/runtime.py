"""A policy inside vLLM's decoder: per-forward token groups, pruned Llama-style layers and
attention over vLLM's paged KV cache with per-layer key visibility (docs/serving.md,
"How it hooks in"; the semantics are docs/design.md, "What skipping means").

vLLM runs every scheduled token of every request of a step as one flat batch of rows. The
family's model class tells the :class:`ServingSession` the policy group of each row (-1 for
text and generated tokens) before each forward; each decoder layer then gathers, per op
kind, the rows that kind processes at that layer, computes them, and adds the result back.

Key visibility. vLLM's attention backends take a causal rule, not a per-layer set of keys,
so under a policy dop computes attention itself, over the same paged cache: the rows whose
``attn_kv`` is processed write their key and value into their slot; the others write a NaN
key there, a *hole* that every query of that layer, now and in every later step, masks out.
The mark lives in the cache block itself, so blocks shared by prefix caching, recomputed
after preemption, or filled over several chunks of a chunked prefill carry their holes with
them. dop owns the layout of the blocks while a policy is on: each block is read and
written only here (``[2, block_size, kv_heads, head_dim]`` per block of the flat tensor).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..policy import OP_KINDS, Policy

HOLE = float("nan")  # the key written for a token whose attn_kv is skipped at a layer


class ServingSession:
    """The policy of one engine and the row groups of the forward in flight."""

    def __init__(self, policy: Policy):
        self.policy = policy
        L, G = policy.num_layers, len(policy.groups)
        # processed[kind][g + 1, l]: row 0 stands for group -1 (text), processed everywhere
        self.processed = {
            k: torch.tensor([[True] * L] + [[policy.processed(k, g, l) for l in range(L)] for g in range(G)],
                            dtype=torch.bool, device="cpu")
            for k in OP_KINDS
        }
        self._pending: torch.Tensor | None = None
        self.groups: torch.Tensor | None = None  # (tokens,) of the forward in flight
        self._rows: dict = {}

    # -- per forward -------------------------------------------------------------------
    def set_groups(self, groups: torch.Tensor) -> None:
        """The group of every row of the next forward (from the family's embedding step)."""
        self._pending = groups

    def begin(self, num_tokens: int, device) -> None:
        """Start a forward of ``num_tokens`` rows: take the groups set for it (a forward
        vLLM runs without embedding step, a warm-up, gets none: every row is text)."""
        g, self._pending = self._pending, None
        if g is None or g.numel() > num_tokens:
            g = torch.full((num_tokens,), -1, dtype=torch.long, device="cpu")
        elif g.numel() < num_tokens:  # vLLM pads the batch; padding rows are text rows no one reads
            g = torch.cat([g.cpu(), torch.full((num_tokens - g.numel(),), -1, dtype=torch.long, device="cpu")])
        self.groups = g.cpu().long()
        self._rows = {}
        self._device = device

    def rows(self, kind: str, layer: int) -> torch.Tensor | None:
        """The rows ``kind`` processes at ``layer``, or None for all rows."""
        key = (kind, layer)
        if key not in self._rows:
            keep = self.processed[kind][self.groups + 1, layer]
            self._rows[key] = None if bool(keep.all()) else torch.nonzero(keep).flatten().to(self._device)
        return self._rows[key]


# ---------------------------------------------------------------------- layers
def pruned_llama_layer(layer, index: int, session: ServingSession):
    """A ``forward`` for vLLM's Llama-style decoder ``layer`` (pre-norm; ``self_attn`` with
    ``qkv_proj``/``rotary_emb``/``o_proj``; ``mlp``) that follows ``session``'s policy. It
    returns ``(0, x)``: vLLM's next layer and final norm add the two (``x + 0 == x``)."""
    attn = layer.self_attn

    def forward(positions, hidden_states, residual, **_):
        x = hidden_states if residual is None else hidden_states + residual
        rq, rkv = session.rows("attn_q", index), session.rows("attn_kv", index)
        out = paged_attention(attn, positions, x, layer.input_layernorm, rq, rkv, session)
        if out is not None:
            _add_rows(x, rq, out)
        rm = session.rows("mlp", index)
        if rm is None or rm.numel():
            h = x if rm is None else x.index_select(0, rm)
            _add_rows(x, rm, layer.mlp(layer.post_attention_layernorm(h)))
        return torch.zeros_like(x), x

    return forward


def _add_rows(x: torch.Tensor, rows: torch.Tensor | None, update: torch.Tensor) -> None:
    if rows is None:
        x.add_(update)
    elif rows.numel():
        x.index_add_(0, rows, update.to(x.dtype))


def paged_attention(attn, positions, x, norm, rq, rkv, session):
    """The attention update of the rows ``rq`` (None: all), with the keys and values of the
    rows ``rkv`` written to vLLM's paged cache and every other row of this forward written as
    a hole; None when no row is a query."""
    from vllm.forward_context import get_forward_context  # heavy: vLLM, an optional extra

    n_all = x.shape[0]
    union = None if rq is None or rkv is None else torch.unique(torch.cat([rq, rkv]))
    if union is not None and union.numel() == 0:
        return None
    h = norm(x if union is None else x.index_select(0, union))
    pos_u = positions if union is None else positions.index_select(0, union)

    def pick(rows):  # rows of the union's tensors that are ``rows``
        if rows is None:
            return slice(None)
        if union is None:
            return rows
        return torch.searchsorted(union, rows)

    # one call of the fused projection over the rows that need q or k/v (vLLM's CPU backend
    # repacks the fused weight, so it is not sliced): a row whose q is kept and k/v skipped,
    # or the reverse, is projected whole (docs/serving.md, "Cost")
    qkv, _ = attn.qkv_proj(h)
    q = qkv[pick(rq), :attn.q_size]
    kv = qkv[pick(rkv), attn.q_size:]
    q_pos, kv_pos = pos_u[pick(rq)], pos_u[pick(rkv)]
    k, v = kv.split([attn.kv_size, attn.kv_size], dim=-1)
    q, _ = attn.rotary_emb(q_pos, q.contiguous(), None)  # vLLM's rotary embedding rotates its
    k, _ = attn.rotary_emb(kv_pos, k.contiguous(), None)  # first argument alone when key is None

    ctx = get_forward_context()
    meta = ctx.attn_metadata
    name = attn.attn.layer_name
    meta = meta.get(name) if isinstance(meta, dict) else meta
    if meta is None:  # vLLM's warm-up and profiling forwards: no cache, no result read
        return torch.zeros((q.shape[0], x.shape[1]), dtype=x.dtype, device=x.device) if q.shape[0] else None
    cache = _blocks(attn.attn.kv_cache, attn)
    n_real = int(meta.num_actual_tokens)
    slots = meta.slot_mapping[:n_real].long()
    H, Hkv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    # holes first, then the kept rows' entries (a kept row's slot is never a hole)
    hole = torch.ones(n_all, dtype=torch.bool, device=x.device)
    if rkv is None:
        hole[:] = False
    else:
        hole[rkv] = False
    hole = hole[:n_real]
    if bool(hole.any()):
        hs = slots[hole]
        cache[hs // cache.block, 0, hs % cache.block] = HOLE
        cache[hs // cache.block, 1, hs % cache.block] = 0.0
    kv_rows = torch.arange(n_all, device=x.device) if rkv is None else rkv
    real = kv_rows < n_real
    ks = slots[kv_rows[real]]
    cache[ks // cache.block, 0, ks % cache.block] = k[real].view(-1, Hkv, hd).to(cache.dtype)
    cache[ks // cache.block, 1, ks % cache.block] = v[real].view(-1, Hkv, hd).to(cache.dtype)

    q_rows = torch.arange(n_all, device=x.device) if rq is None else rq
    out = torch.zeros((q_rows.numel(), H * hd), dtype=q.dtype, device=q.device)
    qsl = meta.query_start_loc.tolist()
    seq_lens = meta.seq_lens.tolist()
    for r, L in enumerate(seq_lens):
        lo, hi = qsl[r], qsl[r + 1]
        mine = torch.nonzero((q_rows >= lo) & (q_rows < hi)).flatten()
        if mine.numel() == 0:
            continue
        kpos = torch.arange(L, device=x.device)
        blk = meta.block_table[r, kpos // cache.block].long()
        K = cache.data[blk, 0, kpos % cache.block].to(q.dtype)  # (L, Hkv, hd)
        V = cache.data[blk, 1, kpos % cache.block].to(q.dtype)
        present = ~torch.isnan(K[:, 0, 0])
        K = torch.where(present[:, None, None], K, 0.0)
        V = torch.where(present[:, None, None], V, 0.0)
        qp = q_pos[mine] if rq is not None else positions[q_rows[mine]]
        visible = present[None, :] & (kpos[None, :] <= qp[:, None])  # (nq, L)
        qh = q[mine].view(-1, H, hd).transpose(0, 1)  # (H, nq, hd)
        rep = H // Hkv
        Kh = K.transpose(0, 1).repeat_interleave(rep, 0)
        Vh = V.transpose(0, 1).repeat_interleave(rep, 0)
        o = F.scaled_dot_product_attention(qh, Kh, Vh, attn_mask=visible[None], scale=attn.scaling)
        o = torch.where(visible.any(-1)[None, :, None], o, 0.0)  # no key to see: a zero update
        out[mine] = o.transpose(0, 1).reshape(-1, H * hd)
    res, _ = attn.o_proj(out)
    return res


class _Blocks:
    """vLLM's KV cache tensor of one layer seen as ``[blocks, 2, block_size, kv_heads, head_dim]``
    (dop's own layout of each block while a policy is on; see the module docstring)."""

    def __init__(self, raw: torch.Tensor, kv_heads: int, head_dim: int, block: int):
        self.data = raw.view(-1, 2, block, kv_heads, head_dim)
        self.block = block
        self.dtype = raw.dtype

    def __setitem__(self, idx, value):
        self.data[idx] = value


def _blocks(raw: torch.Tensor, attn) -> _Blocks:
    if not raw.is_contiguous() or not raw.is_floating_point():
        raise ValueError("dop serving: the KV cache must be a contiguous floating-point tensor "
                         "(start vLLM without --kv-cache-dtype fp8)")
    # vLLM's CPU backend: [blocks, kv_heads, block_size, 2 * head_dim]; flash-attention:
    # [2, blocks, block_size, kv_heads, head_dim]: the block size is dim 2 in both
    block = raw.shape[2]
    per_block = 2 * block * attn.num_kv_heads * attn.head_dim
    if raw.numel() % per_block:
        raise ValueError(f"dop serving: unexpected KV cache shape {tuple(raw.shape)}")
    return _Blocks(raw, attn.num_kv_heads, attn.head_dim, block)
