"""VisPruner (Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective
Token Pruning in VLMs", ICCV 2025, arXiv 2412.01818).

Selection at a budget of ``T = n_keep`` tokens:

1. **Important tokens**: the ``int(T * important_ratio)`` tokens with the highest attention
   from the vision tower's [CLS] token at the feature layer (``vision_feature_layer``: the
   encoder layer whose output the projector reads), heads averaged.
2. **Diverse tokens**: from the rest (in descending attention), duplicates are removed
   iteratively until ``T - T_imp`` remain: split the remainder alternately into two sets
   A (even places) and B (odd places), score each token of A by its largest cosine similarity
   to B, and drop the ``min(8, surplus)`` most similar tokens of A; repeat.

The attention is recomputed from the input of that encoder layer (captured by a forward
pre-hook on the layer, see :meth:`VisPrunerRanker.install`) with the layer's own norm and
q/k projections, so the tower may run with SDPA. Towers without a usable [CLS]
(Qwen2.5-VL, InternVL) score each token by the mean attention it receives (over all
queries of its image, heads averaged), averaged over the patches merged into one LLM token
(Qwen2.5-VL's 2x2 merger, InternVL's pixel shuffle). LLaVA-NeXT: per tile, mapped through
the model's own unpad/pack step; the row-newline tokens have no attention and score lowest.

Cosine similarities use the projected visual tokens (the decoder's input at the visual
positions), which map one to one onto the LLM's visual tokens in every family; the
reference implementation uses the tower's features before the projector.

Ranks: important tokens (attention order), then diverse tokens (attention order), then the
rest (attention order).
"""

from __future__ import annotations

import torch

from ..models.prefix import decoder_input
from .registry import register_ranker
from .base import RankContext, Ranker
from .common import order_desc


def _diverse(features: torch.Tensor, residual: torch.Tensor, keep: int, step: int = 8) -> torch.Tensor:
    """VisPruner's iterative duplicate removal: the surviving tokens of ``residual``."""
    x = torch.nn.functional.normalize(features.double(), dim=-1)
    while True:
        R = residual.numel()
        r = min(step, R - keep)
        if r <= 0:
            return residual
        a_idx, b_idx = residual[::2], residual[1::2]
        if b_idx.numel() == 0:  # a single token left to judge: nothing to compare it with
            return residual[:keep]
        sim = (x[a_idx] @ x[b_idx].T).max(dim=-1).values
        distinct = order_desc(sim)[r:]
        residual = torch.cat([a_idx[distinct], b_idx])


def vispruner_order(scores: torch.Tensor, features: torch.Tensor, n_keep: int, important_ratio: float) -> torch.Tensor:
    """The VisPruner permutation of one image from its attention ``scores`` (n,) and token
    ``features`` (n, d) at a budget of ``n_keep`` tokens."""
    n = scores.numel()
    n_keep = max(0, min(n, int(n_keep)))
    by_attn = order_desc(scores)
    n_imp = int(n_keep * important_ratio)
    important = by_attn[:n_imp]
    diverse = _diverse(features, by_attn[n_imp:], n_keep - n_imp)
    rank_of = torch.empty(n, dtype=torch.long, device=by_attn.device)
    rank_of[by_attn] = torch.arange(n, device=by_attn.device)
    diverse = diverse[torch.argsort(rank_of[diverse], stable=True)]
    chosen = torch.zeros(n, dtype=torch.bool, device=by_attn.device)
    chosen[important] = True
    chosen[diverse] = True
    rest = by_attn[~chosen[by_attn]]
    return torch.cat([important, diverse, rest])


@register_ranker
class VisPrunerRanker(Ranker):
    """[CLS]-attention important tokens + similarity-pruned diverse tokens."""

    name = "vispruner"

    def __init__(self, important_ratio: float = 0.5):
        important_ratio = float(important_ratio)
        if not 0.0 <= important_ratio <= 1.0:
            raise ValueError(f"vispruner: important_ratio must lie in [0, 1], got {important_ratio}")
        self.important_ratio = important_ratio
        self._undo: list = []
        self._captured: list | None = None

    # ------------------------------------------------------------------ hooks
    def install(self, model, adapter) -> None:
        layer = adapter.vision_attention_layer()
        self._extra: dict = {}
        self._undo: list = []

        def capture(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            self._captured = [hidden.detach(), dict(kwargs), dict(self._extra)]

        self._undo.append(layer.register_forward_pre_hook(capture, with_kwargs=True).remove)
        # generate() may encode the images before the forward that ranks, and then the
        # forward's inputs lack the family's image inputs: the adapter records them on the way in
        self._undo.extend(adapter.record_image_inputs(self._extra))

    def uninstall(self) -> None:
        for undo in reversed(getattr(self, "_undo", [])):
            undo()
        self._undo = []
        self._captured = None

    # ------------------------------------------------------------------ ranking
    def rank(self, ctx: RankContext):
        captured, self._captured = self._captured, None
        if captured is None and self._undo:
            raise ValueError(
                "vispruner: the vision tower did not run for this prompt (precomputed image features?); "
                "it needs the tower's attention, pass pixel values"
            )
        if captured is None:  # not inside apply_policy: run the tower once with the hook
            self.install(ctx.model, ctx.adapter)
            try:
                decoder_input(ctx.model, ctx.inputs, ctx.adapter)
                captured = self._captured
            finally:
                self.uninstall()
        scores = token_scores(ctx, captured)
        keeps = ctx.n_keep or [s.n for s in ctx.spans]
        return [
            vispruner_order(sc.to(ctx.embeddings.device), ctx.image_embeddings(s), k, self.important_ratio)
            for sc, s, k in zip(scores, ctx.spans, keeps)
        ]


# ---------------------------------------------------------------------- scores
def token_scores(ctx: RankContext, captured) -> list[torch.Tensor]:
    """Per image, one attention score per LLM visual token (the family's adapter reads them
    from the tower: :meth:`dop.models.base.Adapter.vision_token_scores`)."""
    hidden, kwargs, extra = captured

    def input_of(key):
        val = ctx.inputs.get(key)
        val = val if val is not None else extra.get(key)
        if val is None:
            raise ValueError(f"vispruner: the forward carried no {key} to map the vision tower's tokens")
        return val

    with torch.no_grad():
        flat = ctx.adapter.vision_token_scores(ctx.adapter.vision_attention_layer(), hidden, kwargs, input_of)
    counts = ctx.counts
    if flat.numel() != sum(counts):
        raise ValueError(f"vispruner: {flat.numel()} vision scores for {sum(counts)} visual tokens "
                         f"({type(ctx.adapter).__name__})")
    return list(torch.split(flat, counts))
