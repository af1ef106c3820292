"""Qwen2.5-VL: native-resolution ViT with 2x2 patch merging; multimodal RoPE.

Each image contributes t*h*w / merge^2 tokens, read from `image_grid_thw`."""

from __future__ import annotations

from . import register_adapter
from .base import Adapter


@register_adapter
class Qwen25VLAdapter(Adapter):
    model_types = ("qwen2_5_vl",)
    model_class_name = "Qwen2_5_VLForConditionalGeneration"

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
