"""LLaVA-1.5: CLIP tower, MLP projector, Llama/Vicuna decoder; a fixed token count per image."""

from __future__ import annotations

from . import register_adapter
from .base import Adapter


@register_adapter
class LlavaAdapter(Adapter):
    model_types = ("llava",)
    model_class_name = "LlavaForConditionalGeneration"

    def tokens_per_image(self) -> int:
        vc = self.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        if getattr(self.config, "vision_feature_select_strategy", "default") == "full":
            n += 1
        return n

    def image_counts(self, inputs):
        pv = inputs.get("pixel_values")
        if pv is None:
            return None
        return [self.tokens_per_image()] * int(pv.shape[0])

    def image_grids(self, inputs, counts):
        vc = self.config.vision_config
        side = vc.image_size // vc.patch_size
        return [(side, side) if n == side * side else None for n in counts]
