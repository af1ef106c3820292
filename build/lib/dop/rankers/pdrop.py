"""PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via
Pyramid Visual Redundancy Reduction", CVPR 2025, arXiv 2410.17247).

The decoder is split into stages at ``layers`` (default 8, 16, 24: 0-based indices of the
first layer of the next stage). At each boundary the visual tokens still present are ranked
by the attention they receive from the last instruction token (the last prompt token),
computed with the *next* layer's own ``input_layernorm``, q/k projections and rotary function
on its input (as the reference code does with ``self.layers[rank_layer]``), heads averaged,
the softmax running over the tokens still present; the best ``floor(lambda^s * N)`` stay for
stage ``s``.

As a ranker it declares ``layers``; at each, the runtime hands it that layer's input and the
tokens still active (those every op processed at every earlier layer), and it reorders only
those. The matching policy (:func:`pdrop_policy`) has groups ``[l^S, ..., l^2, l, 1]`` with
depths ``[L, layers[S-1], ..., layers[0]]``, so the nested stages keep exactly the published
counts. Outside a pruned forward (``rank_visual_tokens``) the model is run under that
policy, since later stages depend on the earlier drops.
"""

from __future__ import annotations

from ..policy import Policy
from . import register_ranker
from .base import LayerState, RankContext, Ranker
from .common import check_layers_exist, last_token_attention, present_keys, reorder_active


def parse_layers(layers) -> tuple[int, ...]:
    if isinstance(layers, str):
        parts = [p for p in layers.replace("/", "-").replace(" ", "-").split("-") if p]
        layers = [int(p) for p in parts]
    elif isinstance(layers, int):
        layers = [layers]
    out = tuple(sorted(set(int(l) for l in layers)))
    if not out or out[0] < 1:
        raise ValueError(f"pdrop: stage layers must be positive layer indices, got {layers!r}")
    return out


def pdrop_policy(num_layers: int, layers=(8, 16, 24), ratio: float = 0.5, ranker: str | None = None) -> Policy:
    """The PyramidDrop schedule as a policy: after stage s, ``ratio**s`` of the visual tokens stay."""
    layers = parse_layers(layers)
    if layers[-1] >= num_layers:
        raise ValueError(f"pdrop: stage layer {layers[-1]} does not exist in a {num_layers}-layer decoder")
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"pdrop: ratio (lambda) must lie in (0, 1), got {ratio}")
    S = len(layers)
    groups = [ratio ** s for s in range(S, 0, -1)] + [1.0]
    depths = [num_layers] + [layers[s] for s in range(S - 1, -1, -1)]
    return Policy(num_layers, groups, {"attn": depths, "mlp": list(depths)}, ranker=ranker)


@register_ranker
class PDropRanker(Ranker):
    """Stage-wise re-ranking by the last instruction token's attention."""

    name = "pdrop"

    def __init__(self, layers="8-16-24", ratio: float = 0.5):
        self.layers = parse_layers(layers)
        self.ratio = float(ratio)
        if not 0.0 < self.ratio < 1.0:
            raise ValueError(f"pdrop: ratio (lambda) must lie in (0, 1), got {ratio}")

    def spec(self) -> str:
        return f"pdrop:layers={'-'.join(map(str, self.layers))},ratio={self.ratio:g}"

    def install(self, model, adapter) -> None:
        check_layers_exist(self, adapter)

    def rank(self, ctx: RankContext):
        from ..runtime import apply_policy

        policy = pdrop_policy(ctx.adapter.num_layers, self.layers, self.ratio)
        inputs = dict(ctx.inputs)
        inputs.pop("use_cache", None)
        import torch

        with torch.no_grad(), apply_policy(ctx.model, policy, ranker=self) as handle:
            ctx.model(**inputs, use_cache=False)
            return [p.clone() for p in handle.session.current.ranks]

    def rerank(self, ctx: RankContext, state: LayerState):
        S = state.hidden_states.shape[1]
        att = last_token_attention(state, present_keys(ctx, state, S))
        return [reorder_active(old, act, att[s.positions]) for s, old, act in zip(ctx.spans, state.ranks, state.active)]
