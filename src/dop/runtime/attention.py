"""Attention over the rows a pruned layer keeps, for every attention backend (docs/design.md,
"Attention backends").

The queries and keys of a pruned layer are a subset of the sequence, laid out per batch row
and padded (:class:`~dop.runtime.session.RowSet`). Two cases:

* *same rows*: the queries are exactly the keys of this forward, row by row, and the cache held
  no older entries. The causal rule among the kept rows is then the plain causal rule, so the
  backend's own causal kernel is exact: SDPA with ``is_causal``, or a variable-length kernel
  (flash-attention) over the packed rows with cumulative sequence lengths.
* otherwise an explicit mask: key ``j`` is visible to query ``i`` of the same row iff the key
  exists (not a padding slot, not a hole of a static cache) and its column is not after the
  query's. Eager gets it as an additive mask; every other backend runs SDPA with the boolean
  mask (exact for any backend; flash kernels take no arbitrary masks).

A query that may see no key at all gets no update (docs/design.md, "What skipping means").
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

# impl name -> loader returning a flash-attention style variable-length function
#   fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
#      softmax_scale=None, causal=False) -> (total_q, heads, head_dim)
_VARLEN: dict[str, Callable[[], Callable | None]] = {}


def register_varlen_kernel(impl: str, fn: Callable | None = None, *, loader: Callable | None = None) -> None:
    """Use ``fn`` (or what ``loader()`` returns) as the variable-length causal kernel of models
    whose attention implementation (``LayerParts.implementation``) is ``impl``. Passing neither removes the entry."""
    if fn is None and loader is None:
        _VARLEN.pop(impl, None)
        return
    _VARLEN[impl] = loader if loader is not None else (lambda: fn)


def _flash_attn_2():
    try:
        from flash_attn import flash_attn_varlen_func  # heavy: optional kernel package
    except Exception:  # noqa: BLE001 - not installed or no GPU build: fall back to SDPA
        return None
    return flash_attn_varlen_func


def _flash_attn_3():
    try:
        from flash_attn_interface import flash_attn_varlen_func  # heavy: optional kernel package
    except Exception:  # noqa: BLE001
        return None
    return flash_attn_varlen_func


register_varlen_kernel("flash_attention_2", loader=_flash_attn_2)
register_varlen_kernel("flash_attention_3", loader=_flash_attn_3)


def varlen_kernel(impl: str) -> Callable | None:
    loader = _VARLEN.get(impl)
    return loader() if loader is not None else None


def visible(q_pos: torch.Tensor, kv_pos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """(B, Mq, T) bool: which keys each query may see (-1 marks an empty slot on either side)."""
    ok = (kv_pos[:, None, :] >= 0) & (kv_pos[:, None, :] <= q_pos[:, :, None]) & (q_pos[:, :, None] >= 0)
    if window is not None:
        ok &= kv_pos[:, None, :] > q_pos[:, :, None] - window
    return ok


def attend(parts, q, k, v, *, q_pos, kv_pos, same_rows: bool, counts: torch.Tensor | None,
           segments=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of queries ``q`` (B, H, Mq, hd) over keys/values (B, Hkv, T, hd) of the layer
    whose :class:`~dop.models.LayerParts` are ``parts`` (its scaling, sliding window, attention
    backend and eager function).

    Returns the per-slot output (B, Mq, H * hd) and a (B, Mq) bool of the slots whose output
    is meaningful (a real query that sees at least one key). ``segments``: (query, key) packed
    sequence ids; a query sees only keys of its own sequence."""
    window, impl, attn = parts.sliding_window, parts.implementation, parts.attention
    B, _, Mq, _ = q.shape
    q_real = q_pos >= 0
    if same_rows and window is None:
        kernel = varlen_kernel(impl)
        if kernel is not None:
            return _varlen(kernel, parts.scaling, q, k, v, counts), q_real
        if impl != "eager":  # SDPA's top-left causal rule is exact here: padding slots trail each row
            out, _ = sdpa_attention_forward(attn, q, k, v, None, dropout=0.0, scaling=parts.scaling, is_causal=True)
            return out.reshape(B, Mq, -1), q_real
    allowed = visible(q_pos, kv_pos, window)
    if segments is not None:
        allowed &= segments[0][:, :, None] == segments[1][:, None, :]
    seen = allowed.any(-1)
    # no key for some slot: let it see everything, then drop its output (unconditionally when
    # compiled: a value read back to Python would break the graph)
    if torch.compiler.is_compiling() or not bool(seen.all()):
        allowed = allowed | ~seen[:, :, None]
    mask = allowed[:, None]
    if impl == "eager":
        add = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, torch.finfo(q.dtype).min)
        out, _ = parts.eager(attn, q, k, v, add, dropout=0.0, scaling=parts.scaling)
    else:
        out, _ = sdpa_attention_forward(attn, q, k, v, mask, dropout=0.0, scaling=parts.scaling)
    return out.reshape(B, Mq, -1), q_real & seen


def _varlen(kernel, scaling: float, q, k, v, counts):
    """Causal attention over the packed kept rows of each batch row."""
    B, H, M, hd = q.shape
    valid = torch.arange(M, device=q.device)[None, :] < counts[:, None]
    slots = torch.nonzero(valid.reshape(-1)).flatten()
    pack = lambda x: x.transpose(1, 2).reshape(B * M, x.shape[1], hd).index_select(0, slots)  # noqa: E731
    cu = torch.zeros(B + 1, dtype=torch.int32, device=q.device)
    cu[1:] = torch.cumsum(counts, 0)
    longest = int(counts.max())
    out = kernel(pack(q), pack(k), pack(v), cu, cu, longest, longest, dropout_p=0.0,
                 softmax_scale=scaling, causal=True)
    full = torch.zeros((B * M, H * hd), dtype=out.dtype, device=out.device)
    full.index_copy_(0, slots, out.reshape(out.shape[0], H * hd))
    return full.reshape(B, M, H * hd)
