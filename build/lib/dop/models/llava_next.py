"""LLaVA-NeXT: any-resolution tiles with a newline token per row; images split by runs.

The visual tokens of one image are a base tile followed by the high-resolution tiles
(unpadded, with an `image_newline` per row), so they form no single grid."""

from __future__ import annotations

from . import register_adapter
from .base import Adapter


@register_adapter
class LlavaNextAdapter(Adapter):
    model_types = ("llava_next",)
    model_class_name = "LlavaNextForConditionalGeneration"

    def image_grids(self, inputs, counts):
        return [None] * len(counts)
