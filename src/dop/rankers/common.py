"""Helpers shared by the model-based rankers: decoder-layer attention from a layer's input,
vision-tower hooks, greedy DPP MAP inference, and reordering among the active tokens."""

from __future__ import annotations

import math

import torch

from ..models.base import softmax_attention, vision_layer_index  # noqa: F401  (re-exported)
from ..models.prefix import run_to_layers
from .base import LayerState, RankContext


# ---------------------------------------------------------------------- orderings
def order_desc(scores: torch.Tensor) -> torch.Tensor:
    """Indices by descending score; ties keep the order of appearance (stable)."""
    return torch.sort(scores.double(), descending=True, stable=True).indices


def reorder_active(old: torch.Tensor, active: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Put the active tokens of ``old`` (a rank -> token permutation) into the rank slots that
    active tokens hold, best ``scores`` first; slots of inactive tokens keep their token."""
    old = torch.as_tensor(old).long()
    slot_active = active[old]
    tokens = old[slot_active]
    new = old.clone()
    new[slot_active] = tokens[order_desc(scores[tokens])]
    return new


def visual_mask(length: int, spans, device=None) -> torch.Tensor:
    """(length,) bool: True at the visual positions of ``spans`` (the spans of one prompt)."""
    if device is None:
        device = spans[0].positions.device if spans else "cpu"
    m = torch.zeros(length, dtype=torch.bool, device=device)
    for s in spans:
        m[s.positions.to(device)] = True
    return m


# ---------------------------------------------------------------------- decoder attention
def decoder_qk(state: LayerState) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-RoPE queries (1, H, S, hd) and keys (1, H, S, hd) of the layer in ``state``, from its
    input hidden states through its own attention norm, query/key projections and the family's
    rotary function (the adapter's :class:`~dop.models.LayerParts`); key/value heads are
    repeated to the query heads (GQA)."""
    parts, h = state.parts, state.hidden_states
    hn = parts.attention_input(h)
    S, hd = h.shape[1], parts.head_dim
    q = parts.queries(hn).view(1, S, -1, hd).transpose(1, 2)
    k = parts.keys(hn).view(1, S, -1, hd).transpose(1, 2)
    cos, sin = state.position_embeddings
    q, k = parts.rotary(q, k, cos, sin)
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
    return q, k


def decoder_keys(state: LayerState) -> torch.Tensor:
    """Post-RoPE keys (S, kv_heads * head_dim) of the layer in ``state`` (heads not repeated)."""
    parts, h = state.parts, state.hidden_states
    hn = parts.attention_input(h)
    S, hd = h.shape[1], parts.head_dim
    k = parts.keys(hn).view(1, S, -1, hd).transpose(1, 2)
    cos, sin = state.position_embeddings
    _, k = parts.rotary(k, k, cos, sin)
    return k[0].transpose(0, 1).reshape(S, -1)


def last_token_attention(state: LayerState, key_mask: torch.Tensor) -> torch.Tensor:
    """Attention of the last new token to every position, heads averaged: (S,) with zeros
    outside ``key_mask``. The softmax runs over the keys in ``key_mask`` (the tokens present
    at this layer), scaled by the layer's own ``scaling``."""
    q, k = decoder_qk(state)
    scores = (q[0, :, -1:, :] @ k[0].transpose(-1, -2))[:, 0, :].double() * state.parts.scaling  # (H, S)
    scores = scores.masked_fill(~key_mask[None, :], float("-inf"))
    return torch.softmax(scores, dim=-1).mean(0)


def present_keys(ctx: RankContext, state: LayerState, length: int) -> torch.Tensor:
    """Text positions plus the visual tokens active at this layer."""
    mask = ~visual_mask(length, ctx.spans, state.hidden_states.device)
    for span, act in zip(ctx.spans, state.active):
        mask[span.positions[act]] = True
    return mask


# ---------------------------------------------------------------------- in-LLM rankers
def check_layers_exist(ranker, adapter) -> None:
    """An in-LLM ranker whose layers lie past the decoder would silently never rank."""
    L = adapter.num_layers
    bad = [l for l in ranker.layers if not 0 <= l < L]
    if bad:
        raise ValueError(f"ranker {ranker.name!r} ranks at layer(s) {bad}, but the decoder has {L} layers (0..{L - 1})")


def rank_by_hooks(ranker, ctx: RankContext) -> list[torch.Tensor]:
    """Rank with an in-LLM ranker outside of a pruned forward: run the model unpruned up to
    the input of its last re-ranking layer, then call ``rerank`` layer by layer with every
    visual token active. Exact for rankers whose pruning starts at or after their last
    re-ranking layer (FastV, DART); PyramidDrop's later stages need the pruned forward."""
    wanted = sorted(set(ranker.layers))
    with torch.no_grad():
        seen, _ = run_to_layers(ctx.model, ctx.inputs, wanted, adapter=ctx.adapter)
    captured = {i: (x.hidden, x.kwargs.get("position_embeddings")) for i, x in seen.items()}
    dev = ctx.embeddings.device if ctx.embeddings is not None else "cpu"
    ranks = [torch.arange(s.n, device=dev) for s in ctx.spans]
    active = [torch.ones(s.n, dtype=torch.bool, device=dev) for s in ctx.spans]
    for idx in wanted:
        hidden, pe = captured[idx]
        state = LayerState(idx, hidden, ctx.adapter.layer_parts(idx), pe, active, ranks)
        with torch.no_grad():
            new = ranker.rerank(ctx, state)
        if new is not None:
            ranks = [torch.as_tensor(p).long() for p in new]
    return ranks


# ---------------------------------------------------------------------- DPP
def greedy_dpp(kernel: torch.Tensor, k: int, eps: float = 1e-10) -> list[int]:
    """Greedy MAP inference of a DPP with kernel ``kernel`` (n, n), the fast Cholesky-update
    form (Chen, Zhang & Zhou, NeurIPS 2018): each step adds the item with the largest
    conditional gain ``d_j^2 = L_jj - |c_j|^2``, i.e. the largest increase of log det L_S.
    Stops early when no item adds a positive gain (> eps)."""
    L = kernel.double()
    n = L.shape[0]
    k = min(k, n)
    cis = torch.zeros(k, n, dtype=torch.float64, device=L.device)
    d2 = torch.diagonal(L).clone()
    chosen: list[int] = []
    taken = torch.zeros(n, dtype=torch.bool, device=L.device)
    for i in range(k):
        gains = d2.masked_fill(taken, float("-inf"))
        j = int(torch.argmax(gains))
        if not gains[j] > eps:
            break
        chosen.append(j)
        taken[j] = True
        e = (L[j] - cis[:i, j] @ cis[:i]) / math.sqrt(float(d2[j]))
        cis[i] = e
        d2 = d2 - e * e
    return chosen


# ---------------------------------------------------------------------- vision towers
__all__ = [
    "check_layers_exist", "decoder_keys", "decoder_qk", "greedy_dpp", "last_token_attention", "order_desc", "present_keys",
    "rank_by_hooks", "reorder_active", "softmax_attention", "vision_layer_index", "visual_mask",
]
