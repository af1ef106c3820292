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

import functools

import torch

from . import register_ranker
from .base import RankContext, Ranker
from .common import order_desc, softmax_attention, vision_layer_index


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
    rank_of = torch.empty(n, dtype=torch.long)
    rank_of[by_attn] = torch.arange(n)
    diverse = diverse[torch.argsort(rank_of[diverse], stable=True)]
    chosen = torch.zeros(n, dtype=torch.bool)
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
        layer = _attention_layer(model, adapter)
        self._extra: dict = {}
        self._undo: list = []

        def capture(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            self._captured = [hidden.detach(), dict(kwargs), dict(self._extra)]

        self._undo.append(layer.register_forward_pre_hook(capture, with_kwargs=True).remove)
        # generate() may encode the images before the forward that ranks, and then the
        # forward's inputs lack image_grid_thw / image_sizes: record them on the way in
        mt = adapter.config.model_type
        if mt == "qwen2_5_vl":
            def grid(module, args, kwargs):
                self._extra["image_grid_thw"] = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)

            self._undo.append(adapter.vision_module().register_forward_pre_hook(grid, with_kwargs=True).remove)
        elif mt == "llava_next":
            entry = adapter.entry_module()
            original = entry.get_image_features

            @functools.wraps(original)  # generate() reads its signature to pick the encoder's inputs
            def get_image_features(*args, **kwargs):
                self._extra["image_sizes"] = kwargs.get("image_sizes", args[1] if len(args) > 1 else None)
                return original(*args, **kwargs)

            entry.get_image_features = get_image_features  # on the instance; removed by uninstall
            self._undo.append(lambda: entry.__dict__.pop("get_image_features", None))

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
                from ..runtime.session import capture_decoder_input

                capture_decoder_input(ctx.model, ctx.adapter, ctx.inputs)
                captured = self._captured
            finally:
                self.uninstall()
        scores = token_scores(ctx, captured)
        emb = ctx.embeddings[0]
        keeps = ctx.n_keep or [s.n for s in ctx.spans]
        return [
            vispruner_order(sc, emb[s.positions], k, self.important_ratio)
            for sc, s, k in zip(scores, ctx.spans, keeps)
        ]


# ---------------------------------------------------------------------- per family
def _attention_layer(model, adapter):
    mt = adapter.config.model_type
    tower = adapter.vision_module()
    if mt == "qwen2_5_vl":
        return tower.blocks[-1]
    layers = tower.encoder.layer if mt == "internvl" else getattr(tower, "vision_model", tower).encoder.layers
    f = getattr(adapter.config, "vision_feature_layer", -1)
    if not isinstance(f, int):
        raise ValueError(f"vispruner: a list vision_feature_layer ({f}) is not supported")
    return layers[vision_layer_index(len(layers), f)]


def token_scores(ctx: RankContext, captured) -> list[torch.Tensor]:
    """Per image, one attention score per LLM visual token."""
    mt = ctx.adapter.config.model_type
    layer = _attention_layer(ctx.model, ctx.adapter)
    hidden, kwargs, extra = captured
    with torch.no_grad():
        if mt == "qwen2_5_vl":
            flat = _qwen_scores(ctx, layer, hidden, kwargs, _input(ctx, extra, "image_grid_thw"))
        elif mt == "internvl":
            flat = _internvl_scores(ctx, layer, hidden)
        elif mt == "llava_next":
            flat = _llava_next_scores(ctx, layer, hidden, extra)
        else:
            flat = _cls_rows(ctx, layer, hidden).reshape(-1)
    counts = ctx.counts
    if flat.numel() != sum(counts):
        raise ValueError(f"vispruner: {flat.numel()} vision scores for {sum(counts)} visual tokens ({mt})")
    return list(torch.split(flat, counts))


def _input(ctx, extra, key):
    val = ctx.inputs.get(key)
    val = val if val is not None else extra.get(key)
    if val is None:
        raise ValueError(f"vispruner: the forward carried no {key} to map the vision tower's tokens")
    return val


def _clip_probs(layer, hidden):
    attn = layer.self_attn
    hn = layer.layer_norm1(hidden)
    B, S, _ = hn.shape
    q = attn.q_proj(hn).view(B, S, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(hn).view(B, S, attn.num_heads, attn.head_dim).transpose(1, 2)
    return softmax_attention(q, k, attn.scale)


def _cls_rows(ctx, layer, hidden) -> torch.Tensor:
    """(tiles, tokens): [CLS] attention, heads averaged, over the tokens the projector reads."""
    rows = _clip_probs(layer, hidden)[:, :, 0, :].mean(1)
    if getattr(ctx.adapter.config, "vision_feature_select_strategy", "default") == "default":
        rows = rows[:, 1:]
    return rows


def _llava_next_scores(ctx, layer, hidden, extra) -> torch.Tensor:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = ctx.adapter.config
    rows = _cls_rows(ctx, layer, hidden)
    sizes = _input(ctx, extra, "image_sizes")
    tiles = [
        image_size_to_num_patches(image_size=s, grid_pinpoints=cfg.image_grid_pinpoints, patch_size=cfg.vision_config.image_size)
        for s in sizes
    ]
    per_image = torch.split(rows[..., None], tiles, dim=0)
    newline = torch.full((1,), float("nan"), dtype=rows.dtype)
    packed, _ = ctx.adapter.entry_module().pack_image_features(
        list(per_image), sizes, vision_feature_select_strategy=cfg.vision_feature_select_strategy, image_newline=newline
    )
    flat = torch.cat([p.reshape(-1) for p in packed])
    low = flat[~torch.isnan(flat)].min() if bool((~torch.isnan(flat)).any()) else torch.tensor(0.0, dtype=flat.dtype)
    return torch.where(torch.isnan(flat), low - 1.0, flat)


def _internvl_scores(ctx, layer, hidden) -> torch.Tensor:
    attn = layer.attention
    hn = layer.layernorm_before(hidden)
    B, S, _ = hn.shape
    q = attn.q_norm(attn.q_proj(hn)).view(B, S, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_norm(attn.k_proj(hn)).view(B, S, attn.num_heads, attn.head_dim).transpose(1, 2)
    probs = softmax_attention(q, k, attn.scale)
    received = probs.mean(1).mean(1)  # (B, S): mean over heads, then over queries
    cfg = ctx.adapter.config
    if getattr(cfg, "vision_feature_select_strategy", "default") == "default":
        received = received[:, 1:]
    side = int(round(received.shape[1] ** 0.5))
    grid = received.reshape(B, side, side, 1)
    merged = ctx.adapter.entry_module().pixel_shuffle(grid, scale_factor=cfg.downsample_ratio)
    return merged.mean(-1).reshape(-1)


def _qwen_scores(ctx, block, hidden, kwargs, grid_thw) -> torch.Tensor:
    import sys

    from transformers.vision_utils import get_vision_window_index

    tower = ctx.adapter.vision_module()
    rot = sys.modules[type(block.attn).__module__].apply_rotary_pos_emb_vision
    S = hidden.shape[0]
    attn = block.attn
    qkv = attn.qkv(block.norm1(hidden)).reshape(S, 3, attn.num_heads, -1).permute(1, 0, 2, 3)
    q, k = qkv[0], qkv[1]
    cos, sin = kwargs["position_embeddings"]
    q, k = rot(q, k, cos, sin)
    q, k = q.transpose(0, 1), k.transpose(0, 1)  # (H, S, hd)
    cu = kwargs["cu_seqlens"].tolist()
    received = torch.empty(S, dtype=torch.float64)
    for a, b in zip(cu[:-1], cu[1:]):  # full attention within each image
        probs = softmax_attention(q[:, a:b], k[:, a:b], attn.scaling)
        received[a:b] = probs.mean(0).mean(0)
    unit = tower.spatial_merge_size**2
    merged = received.reshape(-1, unit).mean(-1)  # window order
    window_index, _ = get_vision_window_index(
        grid_thw, spatial_merge_size=tower.spatial_merge_size,
        window_size=tower.window_size, patch_size=tower.patch_size,
    )
    return merged[torch.argsort(window_index)]
