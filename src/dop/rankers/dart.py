"""DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More", arXiv 2502.11494).

DART runs the first ``K`` decoder layers (default 2) on every token and then keeps
``n_keep`` visual tokens chosen for being *unlike* a few pivots:

1. Pivots: the ``pivots`` visual tokens (default 4) and the ``text_pivots`` text tokens after
   the image (default 4) with the largest L1 norm of their keys in layer ``K - 1`` (the last
   layer run on all tokens; post-RoPE keys, all key/value heads concatenated), as the
   reference code does with that layer's key states.
2. For each pivot in turn (visual pivots first, by key norm, then text pivots), the
   ``ceil((n_keep - visual pivots) / all pivots)`` remaining visual tokens least
   cosine-similar to it are kept, the similarity measured on the input of layer ``K``
   passed through the decoder's final norm. The last pivot takes only what is left to reach
   ``n_keep``; if candidates run out first, the rest are filled by key norm.

As a ranker it declares ``layers = (K - 1, K)``: at ``K - 1`` it reads the keys, at ``K`` it
selects among the tokens still active, with ``n_keep`` = the visual tokens the policy still
processes at layer ``K``. Ranks: visual pivots, then the kept tokens in the order they were
picked, then the rest by descending key norm. Outside a pruned forward the model runs
unpruned up to layer ``K`` (exact: pruning starts there).
"""

from __future__ import annotations

import math

import torch

from .registry import register_ranker
from .base import LayerState, RankContext, Ranker
from .common import check_layers_exist, decoder_keys, order_desc, rank_by_hooks, visual_mask


def place_active(old: torch.Tensor, active: torch.Tensor, ordered: torch.Tensor) -> torch.Tensor:
    """Fill the rank slots of active tokens with ``ordered`` (the active tokens, best first)."""
    old = torch.as_tensor(old).long()
    slot_active = active[old]
    new = old.clone()
    new[slot_active] = ordered
    return new


def dart_select(cand: torch.Tensor, key_norm: torch.Tensor, feats: torch.Tensor, text_pivots: torch.Tensor,
                n_keep: int, n_pivots: int) -> torch.Tensor:
    """DART's order over candidate tokens ``cand`` (indices into ``key_norm``/``feats``).
    ``text_pivots`` are rows of ``feats`` used as extra pivots."""
    cand = cand[order_desc(key_norm[cand])]  # by key norm, ties in order of appearance
    n_keep = max(0, min(int(n_keep), cand.numel()))
    pivots = cand[: min(n_pivots, n_keep)]
    chosen = list(pivots.tolist())
    left = torch.ones(cand.numel(), dtype=torch.bool, device=cand.device)
    left[: pivots.numel()] = False
    x = torch.nn.functional.normalize(feats.double(), dim=-1)
    all_pivots = list(pivots.tolist()) + list(text_pivots.tolist())
    quota = math.ceil((n_keep - pivots.numel()) / max(1, len(all_pivots)))
    for p in all_pivots:
        need = min(quota, n_keep - len(chosen), int(left.sum()))
        if need <= 0:
            continue
        pool = cand[left]
        sim = x[pool] @ x[p]
        picked = pool[order_desc(-sim)[:need]]
        chosen.extend(picked.tolist())
        left &= ~torch.isin(cand, picked)
    if len(chosen) < n_keep:  # candidates ran out for the pivots' quota: fill by key norm
        extra = cand[left][: n_keep - len(chosen)]
        chosen.extend(extra.tolist())
        left &= ~torch.isin(cand, extra)
    return torch.cat([torch.tensor(chosen, dtype=torch.long, device=cand.device), cand[left]])


@register_ranker
class DARTRanker(Ranker):
    """Duplication-aware selection around key-norm pivots, at layer K."""

    name = "dart"

    def __init__(self, K: int = 2, pivots: int = 4, text_pivots: int = 4):
        K = int(K)
        if K < 1:
            raise ValueError(f"dart: K (layers run on every token) must be >= 1, got {K}")
        if int(pivots) < 0 or int(text_pivots) < 0:
            raise ValueError("dart: pivots and text_pivots must be >= 0")
        self.K = K
        self.pivots = int(pivots)
        self.text_pivots = int(text_pivots)
        self.layers = (K - 1, K)
        # key norms of layer K - 1, one entry per prompt: a batch is re-ranked row by row, in
        # the same row order at layer K - 1 and at layer K (first in, first out)
        self._norms: list[torch.Tensor] = []

    def install(self, model, adapter) -> None:
        check_layers_exist(self, adapter)

    def rank(self, ctx: RankContext):
        return rank_by_hooks(self, ctx)

    def rerank(self, ctx: RankContext, state: LayerState):
        if state.layer_idx == self.K - 1:
            self._norms.append(decoder_keys(state).abs().sum(-1))
            return None
        norms = self._norms.pop(0) if self._norms else None
        if norms is None:
            raise RuntimeError("dart: layer K ran without the keys of layer K - 1")
        feats = ctx.adapter.final_norm(state.hidden_states)[0]
        S = feats.shape[0]
        is_text = ~visual_mask(S, ctx.spans, feats.device)
        out = []
        keeps = ctx.n_keep or [s.n for s in ctx.spans]
        for span, old, act, keep in zip(ctx.spans, state.ranks, state.active, keeps):
            pos = span.positions
            after = is_text.clone()
            after[: int(pos[-1]) + 1] = False
            txt = torch.nonzero(after).flatten()
            txt = txt[order_desc(norms[txt])][: self.text_pivots]
            # work in sequence positions, map back to the image's token indices
            cand_tok = torch.nonzero(act).flatten()
            order_pos = dart_select(pos[cand_tok], norms, feats, txt, min(keep, cand_tok.numel()), self.pivots)
            tok_of_pos = {int(p): i for i, p in enumerate(pos.tolist())}
            ordered = torch.tensor([tok_of_pos[int(p)] for p in order_pos], dtype=torch.long, device=feats.device)
            out.append(place_active(old, act, ordered))
        return out
