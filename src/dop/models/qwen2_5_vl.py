"""Qwen2.5-VL: native-resolution ViT with 2x2 patch merging; multimodal RoPE.

Each image contributes t*h*w / merge^2 tokens, read from `image_grid_thw`."""

from __future__ import annotations

import functools

import torch

from .. import compat
from . import register_adapter
from .base import Adapter, softmax_attention


@register_adapter
class Qwen25VLAdapter(Adapter):
    model_types = ("qwen2_5_vl",)
    model_class_name = "Qwen2_5_VLForConditionalGeneration"

    def padded_position_ids(self, attention_mask):
        return None  # the model's rope index reads the attention mask itself (3-D positions)

    # -- multimodal RoPE across transformers versions ------------------------------------
    # transformers 5.17 moved the merge of Qwen2.5-VL's mrope sections (channels taking the
    # temporal, height or width position) into the rotary module: its decoder layers get one
    # (B, S, head_dim) cos/sin row per token and rotate with the plain apply_rotary_pos_emb.
    # In 5.16 they get (3, B, S, head_dim), one slice per position dimension, and
    # apply_multimodal_rotary_pos_emb merges the sections itself. dop computes on the per-token
    # layout (docs/design.md, "Supported transformers versions"); the tensors' rank tells which
    # one a layer received, the modeling module's functions which one its layers expect.
    @functools.cached_property
    def _sectioned_rope(self) -> bool:
        """True where the family's decoder layers take cos/sin per position dimension (5.16)."""
        return not hasattr(compat.modeling_module(self.decoder_layers()[0].self_attn), "apply_rotary_pos_emb")

    def token_rope(self, position_embeddings):
        if position_embeddings is None or position_embeddings[0].dim() != 4:
            return position_embeddings
        sections = list(self.config.get_text_config().rope_parameters["mrope_section"]) * 2
        cos = position_embeddings[0]
        # channel c follows position dimension `which[c]`: the i-th section the (i % 3)-th
        which = torch.cat([torch.full((n,), i % 3, dtype=torch.long, device=cos.device) for i, n in enumerate(sections)])
        pick = which[None, None, None, :].expand(1, *cos.shape[1:])
        return tuple(t.gather(0, pick)[0] for t in position_embeddings)

    def layer_rope(self, position_embeddings):
        if position_embeddings is None or position_embeddings[0].dim() != 3 or not self._sectioned_rope:
            return position_embeddings
        # the same per-token rows for every position dimension: merging them gives them back
        return tuple(t[None].expand(3, -1, -1, -1) for t in position_embeddings)

    def rotary_function(self, attn):
        module = compat.modeling_module(attn)
        if hasattr(module, "apply_rotary_pos_emb"):
            return module.apply_rotary_pos_emb
        # 5.16: only the sectioned form; on per-token cos/sin it is Qwen2's rotation, op for op
        from transformers.models.qwen2 import modeling_qwen2  # heavy: transformers, only on 5.16

        return modeling_qwen2.apply_rotary_pos_emb

    def _merge(self) -> int:
        return int(getattr(self.config.vision_config, "spatial_merge_size", 2))

    def image_counts(self, inputs):
        thw = inputs.get("image_grid_thw")
        if thw is None:
            return None
        m2 = self._merge() ** 2
        return [int(t * h * w) // m2 for t, h, w in thw.tolist()]

    def image_grids(self, inputs, counts):
        thw = inputs.get("image_grid_thw")
        if thw is None:
            return [None] * len(counts)
        m = self._merge()
        return [(int(h) // m, int(w) // m) if int(t) == 1 else None for t, h, w in thw.tolist()]

    @classmethod
    def flops_layout(cls, config, text_hidden):
        """Native-resolution ViT (windowed attention but in ``fullatt_block_indexes``), a 2x2
        merger into ``out_hidden_size``; 1024 tokens by default."""
        vc = config.vision_config
        merge = int(vc.spatial_merge_size)
        width = int(vc.hidden_size) * merge * merge
        vision = dict(
            type="qwen2_5_vl", num_layers=int(vc.depth), hidden_size=int(vc.hidden_size),
            intermediate_size=int(vc.intermediate_size), num_heads=int(vc.num_heads), patch_size=int(vc.patch_size),
            in_channels=int(getattr(vc, "in_channels", 3)), mlp_matrices=3, temporal_patch_size=int(vc.temporal_patch_size),
            spatial_merge_size=merge, window_size=int(vc.window_size),
            fullatt_layers=tuple(int(i) for i in vc.fullatt_block_indexes), name=getattr(vc, "model_type", "") or "",
        )
        return dict(vision=vision, projector_dims=(width, width, int(vc.out_hidden_size)), default_visual_tokens=1024,
                    tokens_per_tile=None, max_tiles=1)

    def vision_attention_layer(self):
        return self.vision_module().blocks[-1]  # the final block attends over whole images

    def record_image_inputs(self, record):
        def grid(module, args, kwargs):
            record["image_grid_thw"] = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)

        return [self.vision_module().register_forward_pre_hook(grid, with_kwargs=True).remove]

    def vision_token_scores(self, block, hidden, kwargs, input_of):
        """The mean attention each patch receives within its image (final block, heads
        averaged), averaged over the 2x2 patches merged into one LLM token, in token order
        (the tower runs in window order)."""
        from transformers.vision_utils import get_vision_window_index  # heavy: transformers' vision utilities, only when ranking

        tower = self.vision_module()
        rot = compat.modeling_module(block.attn).apply_rotary_pos_emb_vision
        S, attn = hidden.shape[0], block.attn
        qkv = attn.qkv(block.norm1(hidden)).reshape(S, 3, attn.num_heads, -1).permute(1, 0, 2, 3)
        q, k = rot(qkv[0], qkv[1], *kwargs["position_embeddings"])
        q, k = q.transpose(0, 1), k.transpose(0, 1)  # (H, S, hd)
        cu = kwargs["cu_seqlens"].tolist()
        received = torch.empty(S, dtype=torch.float64, device=hidden.device)
        for a, b in zip(cu[:-1], cu[1:]):  # full attention within each image
            received[a:b] = softmax_attention(q[:, a:b], k[:, a:b], attn.scaling).mean(0).mean(0)
        merged = received.reshape(-1, tower.spatial_merge_size**2).mean(-1)  # window order
        window_index, _ = get_vision_window_index(
            input_of("image_grid_thw"), spatial_merge_size=tower.spatial_merge_size,
            window_size=tower.window_size, patch_size=tower.patch_size,
        )
        return merged[torch.argsort(window_index)]
