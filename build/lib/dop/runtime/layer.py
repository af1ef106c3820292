"""The wrapped decoder layer: gather the rows an op processes, compute, scatter-add back.

Works for the pre-norm decoder layers of all supported families (Llama, Qwen2, Qwen2.5-VL
text): ``input_layernorm``, ``self_attn.{q,k,v,o}_proj``, ``post_attention_layernorm``,
``mlp``. Attention runs through the model's configured implementation (`eager`, `sdpa`),
RoPE through the family's own ``apply_rotary_pos_emb`` on the gathered cos/sin rows.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .session import ForwardState, PruneSession


def _take(x: torch.Tensor, rows: torch.Tensor | None, dim: int = 1) -> torch.Tensor:
    return x if rows is None else x.index_select(dim, rows)


def _same_rows(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.numel() == b.numel() and bool(torch.equal(a, b))


def _add(h: torch.Tensor, rows: torch.Tensor | None, update: torch.Tensor) -> torch.Tensor:
    return h + update if rows is None else h.index_add(1, rows, update)


class PrunedDecoderLayer(nn.Module):
    """Stands in for one decoder layer while a policy is applied; ``base_layer`` is the original."""

    def __init__(self, base_layer: nn.Module, layer_idx: int, session: PruneSession):
        super().__init__()
        self.base_layer = base_layer
        self.layer_idx = layer_idx
        self.session = session
        attn = base_layer.self_attn
        family = sys.modules[type(attn).__module__]
        self._rotary = getattr(family, "apply_rotary_pos_emb")
        self._eager = getattr(family, "eager_attention_forward", None)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not hasattr(attn, name):
                raise ValueError(f"{type(attn).__name__} has no {name}; this decoder layer layout is not supported")

    def __getattr__(self, name):  # expose the original layer's attributes (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None,
                use_cache=False, position_embeddings=None, **kwargs):
        if "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        s = self.session
        st = s.current
        if st is None or s.bypass or not s.needs_pruning(st):
            return self.base_layer(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=cache, use_cache=use_cache, position_embeddings=position_embeddings,
                                   **kwargs)
        if hidden_states.shape[1] != st.n_new:
            raise RuntimeError(f"layer {self.layer_idx}: got {hidden_states.shape[1]} tokens, expected {st.n_new}")
        if self.layer_idx == 0 and st.depths is None and st.has_visual:
            s.prepare(st, hidden_states)
        s.maybe_rerank(st, self.layer_idx, hidden_states, self.base_layer, position_embeddings, self._rotary)
        return self._pruned_forward(st, hidden_states, position_embeddings, cache if use_cache or cache is not None else None)

    # ------------------------------------------------------------------ the computation
    def _pruned_forward(self, st: ForwardState, h, position_embeddings, cache):
        s, l = self.session, self.layer_idx
        layer = self.base_layer
        attn = layer.self_attn
        rows_q = s.rows(st, "attn_q", l)
        rows_kv = s.rows(st, "attn_kv", l)
        rows_m = s.rows(st, "mlp", l)
        pos_new = st.past + st.positions

        # -- keys/values of the rows that keep attn_kv at this layer
        cos, sin = position_embeddings
        hn_kv = layer.input_layernorm(_take(h, rows_kv))
        k = self._heads(attn.k_proj(hn_kv), attn)
        v = self._heads(attn.v_proj(hn_kv), attn)
        _, k = self._rotary(k, k, _take(cos, rows_kv), _take(sin, rows_kv))
        kv_pos_new = _take(pos_new, rows_kv, 0)
        record = st.record
        if cache is not None:
            k, v = cache.update(k, v, l)
            prev = record.kv_pos.get(l) if record is not None else None
            kv_pos = kv_pos_new if prev is None else torch.cat([prev, kv_pos_new])
            if record is not None:
                record.kv_pos[l] = kv_pos
                if kv_pos.numel() < record.seen:
                    record.pruned = True
        else:
            kv_pos = kv_pos_new

        # -- queries of the rows that keep attn_q; a query with no allowed key gets no update
        q_pos = _take(pos_new, rows_q, 0)
        n_kv = kv_pos.numel()
        # kv_pos is increasing, so a query sees some key iff it is not before the first one
        keep = q_pos >= kv_pos[0] if n_kv else torch.zeros_like(q_pos, dtype=torch.bool)
        if not bool(keep.all()):
            rows_q = (st.positions if rows_q is None else rows_q)[keep]
            q_pos = q_pos[keep]
        if q_pos.numel() > 0:
            same = _same_rows(rows_q, rows_kv)
            hn_q = hn_kv if same else layer.input_layernorm(_take(h, rows_q))
            q = self._heads(attn.q_proj(hn_q), attn)
            q, _ = self._rotary(q, q, _take(cos, rows_q), _take(sin, rows_q))
            mask = self._mask(q_pos, kv_pos, same and n_kv == q_pos.numel(), q.dtype)
            fn = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, self._eager)
            if fn is None:
                raise ValueError(
                    f"attention implementation {attn.config._attn_implementation!r} is not supported by the "
                    "pruning runtime yet (flash_attention_2 needs a variable-length path); load the model with attn_implementation='sdpa' or 'eager'"
                )
            extra = {}
            if getattr(attn, "sliding_window", None) is not None:
                extra["sliding_window"] = attn.sliding_window
            out, _ = fn(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling, **extra)
            out = attn.o_proj(out.reshape(1, q_pos.numel(), -1))
            h = _add(h, rows_q, out)

        # -- MLP on its rows
        if rows_m is None or rows_m.numel():
            h = _add(h, rows_m, layer.mlp(layer.post_attention_layernorm(_take(h, rows_m))))
        return h

    @staticmethod
    def _heads(x: torch.Tensor, attn) -> torch.Tensor:
        return x.view(1, x.shape[1], x.shape[-1] // attn.head_dim, attn.head_dim).transpose(1, 2)

    def _mask(self, q_pos, kv_pos, same_rows: bool, dtype):
        """None where the implementation's own causal rule is right, else an additive mask."""
        impl = self.base_layer.self_attn.config._attn_implementation
        nq = q_pos.numel()
        if nq == 1 and bool((kv_pos <= q_pos[0]).all()):
            return None  # one query that may see every key (decoding)
        if same_rows and impl != "eager":
            return None  # same rows for q and kv, no older entries: top-left causal is exact
        allowed = kv_pos[None, :] <= q_pos[:, None]
        mask = torch.zeros(allowed.shape, dtype=dtype)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[None, None]
