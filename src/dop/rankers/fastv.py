"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024, arXiv 2403.06764).

FastV runs the first ``K`` decoder layers on every token, then keeps the visual tokens that
received the most attention from the last prompt token in the K-th layer (heads averaged),
and drops the others from layer ``K`` on (0-based layer indices: the attention map of layer
``K - 1``, pruning from layer ``K``; the published default is ``K = 2``). This is what the
reference code does: it ranks with ``last_layer_attention`` of the layer before the first
pruned one.

Here the ranker declares ``layers = (K - 1,)``: before layer ``K - 1`` the runtime hands it
that layer's input, and the attention row is recomputed from the layer's own
``input_layernorm``, ``q_proj``/``k_proj`` and rotary function (key/value heads repeated for
GQA), so no eager attention is needed. Every visual token is still active there, so the
ranking is the full attention order (ties: order of appearance); the policy decides how many
survive (see :func:`dop.baselines.fastv`). Outside a pruned forward (``rank_visual_tokens``)
the model runs unpruned up to that layer.
"""

from __future__ import annotations

from .registry import register_ranker
from .base import LayerState, RankContext, Ranker
from .common import check_layers_exist, last_token_attention, present_keys, rank_by_hooks, reorder_active


@register_ranker
class FastVRanker(Ranker):
    """Attention of the last prompt token at the K-th decoder layer."""

    name = "fastv"

    def __init__(self, K: int = 2):
        K = int(K)
        if K < 1:
            raise ValueError(f"fastv: K (layers run on every token) must be >= 1, got {K}")
        self.K = K
        self.layers = (K - 1,)

    def install(self, model, adapter) -> None:
        check_layers_exist(self, adapter)

    def rank(self, ctx: RankContext):
        return rank_by_hooks(self, ctx)

    def rerank(self, ctx: RankContext, state: LayerState):
        S = state.hidden_states.shape[1]
        att = last_token_attention(state, present_keys(ctx, state, S))
        return [reorder_active(old, act, att[s.positions]) for s, old, act in zip(ctx.spans, state.ranks, state.active)]
