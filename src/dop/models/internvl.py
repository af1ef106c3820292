"""InternVL3: InternViT tiles, pixel-shuffle downsampling, Qwen2.5 decoder.

Each image is wrapped as `<img>` + tokens of all its tiles + `</img>`, so runs of image
tokens delimit images; each tile is a square grid of `image_seq_length` tokens."""

from __future__ import annotations

from . import register_adapter
from .base import Adapter, feature_layer, softmax_attention, vit_flops_fields


@register_adapter
class InternVLAdapter(Adapter):
    model_types = ("internvl",)
    model_class_name = "InternVLForConditionalGeneration"

    def image_grids(self, inputs, counts):
        per_tile = int(getattr(self.config, "image_seq_length", 256))
        side = int(round(per_tile**0.5))
        grids = []
        for n in counts:
            tiles = n // per_tile if per_tile else 0
            # tiles stacked vertically: rows of `side` tokens, still row-major per tile
            grids.append((tiles * side, side) if side * side == per_tile and tiles * per_tile == n else None)
        return grids

    @classmethod
    def flops_layout(cls, config, text_hidden):
        """Pixel shuffle merges ``1 / downsample_ratio^2`` patches into one token; up to 12
        tiles and a thumbnail (13), 5 by default."""
        vision = vit_flops_fields(getattr(config, "vision_config", None))
        if vision is None:
            return None
        factor = int(round(1 / float(getattr(config, "downsample_ratio", 0.5)))) ** 2
        per_tile = (vision["image_size"] // vision["patch_size"]) ** 2 // factor
        return dict(vision=vision, projector_dims=(vision["hidden_size"] * factor, text_hidden, text_hidden),
                    default_visual_tokens=per_tile * 5, tokens_per_tile=per_tile, max_tiles=13)

    def vision_attention_layer(self):
        return feature_layer(self.config, self.vision_module().encoder.layer)

    def vision_token_scores(self, layer, hidden, kwargs, input_of):
        """No usable [CLS]: the mean attention each patch receives (over the queries of its
        tile, heads averaged), averaged over the patches the pixel shuffle merges."""
        attn = layer.attention
        hn = layer.layernorm_before(hidden)
        B, S, _ = hn.shape
        q = attn.q_norm(attn.q_proj(hn)).view(B, S, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(hn)).view(B, S, attn.num_heads, attn.head_dim).transpose(1, 2)
        received = softmax_attention(q, k, attn.scale).mean(1).mean(1)  # (B, S): heads, then queries
        cfg = self.config
        if getattr(cfg, "vision_feature_select_strategy", "default") == "default":
            received = received[:, 1:]
        side = int(round(received.shape[1] ** 0.5))
        merged = self.entry_module().pixel_shuffle(received.reshape(B, side, side, 1), scale_factor=cfg.downsample_ratio)
        return merged.mean(-1).reshape(-1)
