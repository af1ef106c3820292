"""InternVL3: InternViT tiles, pixel-shuffle downsampling, Qwen2.5 decoder.

Each image is wrapped as `<img>` + tokens of all its tiles + `</img>`, so runs of image
tokens delimit images; each tile is a square grid of `image_seq_length` tokens."""

from __future__ import annotations

from . import register_adapter
from .base import Adapter


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
