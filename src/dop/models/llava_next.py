"""LLaVA-NeXT: any-resolution tiles with a newline token per row; images split by runs.

The visual tokens of one image are a base tile followed by the high-resolution tiles
(unpadded, with an `image_newline` per row), so they form no single grid."""

from __future__ import annotations

import functools
import inspect

import torch

from . import register_adapter
from .base import Adapter, cls_attention_rows


@register_adapter
class LlavaNextAdapter(Adapter):
    model_types = ("llava_next",)
    model_class_name = "LlavaNextForConditionalGeneration"

    def image_grids(self, inputs, counts):
        return [None] * len(counts)

    @classmethod
    def max_tiles(cls, config, image_size):
        """The base tile and the most high-resolution tiles of any grid pinpoint."""
        pins = getattr(config, "image_grid_pinpoints", None) or [[image_size, image_size]]
        return 1 + max((h // image_size) * (w // image_size) for h, w in pins)

    # what ``get_image_features`` receives beside the pixels that the scores below read
    recorded_image_inputs: tuple[str, ...] = ("image_sizes",)

    def record_image_inputs(self, record):
        # generate() may encode the images before the forward that ranks, without image_sizes
        entry = self.entry_module()
        original = entry.get_image_features
        signature = inspect.signature(original)

        @functools.wraps(original)  # generate() reads its signature to pick the encoder's inputs
        def get_image_features(*args, **kwargs):
            given = signature.bind_partial(*args, **kwargs).arguments
            for name in self.recorded_image_inputs:
                record[name] = given.get(name)
            return original(*args, **kwargs)

        entry.get_image_features = get_image_features  # on the instance; the undo removes it
        return [lambda: entry.__dict__.pop("get_image_features", None)]

    def tile_scores(self, layer, hidden):
        """(tiles, tokens): one score per vision token of each tile, before the pack step."""
        return cls_attention_rows(self.config, layer, hidden)

    def tiles_per_image(self, input_of) -> list[int]:
        """How many tiles the vision tower encoded for each image."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches  # heavy: a modeling module, only when ranking

        cfg = self.config
        return [image_size_to_num_patches(image_size=s, grid_pinpoints=cfg.image_grid_pinpoints,
                                          patch_size=cfg.vision_config.image_size)
                for s in input_of("image_sizes")]

    def pack_tiles(self, per_image, input_of, newline) -> list:
        """The model's own unpad/pack step applied to per-tile maps (one channel)."""
        packed, _ = self.entry_module().pack_image_features(
            list(per_image), input_of("image_sizes"),
            vision_feature_select_strategy=self.config.vision_feature_select_strategy, image_newline=newline,
        )
        return packed

    def vision_token_scores(self, layer, hidden, kwargs, input_of):
        """Per tile scores (:meth:`tile_scores`), mapped through the model's own unpad/pack
        step; the row-newline tokens have no attention and score lowest."""
        rows = self.tile_scores(layer, hidden)
        per_image = torch.split(rows[..., None], self.tiles_per_image(input_of), dim=0)
        newline = torch.full((1,), float("nan"), dtype=rows.dtype, device=rows.device)
        flat = torch.cat([p.reshape(-1) for p in self.pack_tiles(per_image, input_of, newline)])
        known = ~torch.isnan(flat)
        low = flat[known].min() if bool(known.any()) else torch.tensor(0.0, dtype=flat.dtype, device=flat.device)
        return torch.where(known, flat, low - 1.0)
