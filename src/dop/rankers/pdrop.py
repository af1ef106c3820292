"""PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via
Pyramid Visual Redundancy Reduction", CVPR 2025, arXiv 2410.17247).

The decoder is split into stages at ``layers`` (0-based indices of the first layer of the
next stage; default :func:`default_stage_layers`, the quarter points of the decoder: 8, 16,
24 for 32 layers as published, 2, 4, 6 for 8). At each boundary the visual tokens still present are ranked
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
from .registry import register_ranker
from .base import LayerState, RankContext, Ranker
from .common import check_layers_exist, last_token_attention, present_keys, reorder_active


def default_stage_layers(num_layers: int) -> tuple[int, ...]:
    """PyramidDrop's stage layers scaled to the depth: the quarter points ``L/4, L/2, 3L/4``
    (8-16-24 for 32 layers, as published), one default everywhere (ranker, baseline, run)."""
    return tuple(sorted({max(1, round(num_layers * k / 4)) for k in (1, 2, 3)}))


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


def pdrop_policy(num_layers: int, layers=None, ratio: float = 0.5, ranker: str | None = None) -> Policy:
    """The PyramidDrop schedule as a policy: after stage s, ``ratio**s`` of the visual tokens stay
    (``layers`` None: :func:`default_stage_layers`)."""
    layers = parse_layers(default_stage_layers(num_layers) if layers is None else layers)
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

    def __init__(self, layers=None, ratio: float = 0.5):
        # layers None: the quarter points of the model's depth, fixed by bind(num_layers)
        self._layers = parse_layers(layers) if layers is not None else None
        self.ratio = float(ratio)
        if not 0.0 < self.ratio < 1.0:
            raise ValueError(f"pdrop: ratio (lambda) must lie in (0, 1), got {ratio}")

    @property
    def layers(self) -> tuple[int, ...]:
        if self._layers is None:
            raise ValueError(
                "pdrop: the default stage layers are the quarter points of the model's depth, not known yet; "
                "resolve the ranker with dop.rankers.resolve_for_model(ranker, num_layers) or name the layers "
                "(pdrop:layers=8-16-24)"
            )
        return self._layers

    def bind(self, num_layers: int) -> "PDropRanker":
        """Fix default stage layers for a ``num_layers``-layer decoder (no-op when given)."""
        if self._layers is None:
            self._layers = default_stage_layers(num_layers)
        return self

    def spec(self) -> str:
        layers = "quarters" if self._layers is None else "-".join(map(str, self._layers))
        return f"pdrop:layers={layers},ratio={self.ratio:g}"

    def install(self, model, adapter) -> None:
        self.bind(adapter.num_layers)
        check_layers_exist(self, adapter)

    def standalone_policy(self, num_layers: int) -> Policy:
        """PyramidDrop's ranks come from its own pruned forward (each stage re-ranks the tokens
        the previous stages kept): ranking outside a policy runs this one
        (:func:`dop.runtime.rank_visual_tokens`)."""
        self.bind(num_layers)
        return pdrop_policy(num_layers, self.layers, self.ratio)

    def rank(self, ctx: RankContext):
        raise ValueError("pdrop ranks inside its own pruned forward (standalone_policy); "
                         "call dop.rank_visual_tokens or apply a policy")

    def rerank(self, ctx: RankContext, state: LayerState):
        S = state.hidden_states.shape[1]
        att = last_token_attention(state, present_keys(ctx, state, S))
        return [reorder_active(old, act, att[s.positions]) for s, old, act in zip(ctx.spans, state.ranks, state.active)]
