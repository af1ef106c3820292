"""LLaVA-OneVision: SigLIP tiles without a [CLS] token, LLaVA-NeXT's any-resolution layout,
Qwen2 decoder (docs/design.md, "Adding a family", uses this file as its worked example).

An image alone in its prompt is a base tile followed by its high-resolution tiles, unpadded,
shrunk by bilinear interpolation to about ``anyres_max_N`` tiles' worth of tokens, with an
``image_newline`` per row; an image of a multi-image prompt (``batch_num_images`` > 1) is
its base tile and one newline. The token counts and the score layout are read from the
model's own pack step (``pack_image_features``), run on one-channel maps."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from . import register_adapter
from .base import vit_attention, vit_flops_fields
from .llava_next import LlavaNextAdapter

TYPICAL_IMAGE = (480, 640)  # (height, width): a 4:3 photo, the image the FLOPs count assumes by default


@register_adapter
class LlavaOnevisionAdapter(LlavaNextAdapter):
    model_types = ("llava_onevision",)
    model_class_name = "LlavaOnevisionForConditionalGeneration"
    recorded_image_inputs = ("image_sizes", "batch_num_images")

    # -- which tokens are visual -------------------------------------------------------
    def image_counts(self, inputs):
        """Exact counts (adjacent images need not be split by text): from the pixel inputs'
        sizes, or from the image features ``generate`` encoded before the forward."""
        encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is not None and isinstance(encoded.pooler_output, (list, tuple)):
            return [int(f.shape[0]) for f in encoded.pooler_output]
        sizes = inputs.get("image_sizes")
        if sizes is None or inputs.get("pixel_values") is None:
            return None
        return packed_counts(self.config, sizes, inputs.get("batch_num_images"))

    # -- the vision tower's pieces the rankers read -------------------------------------
    def tile_scores(self, layer, hidden):
        """No [CLS] in SigLIP: the mean attention each patch receives within its tile (heads,
        then queries averaged), as for the other towers without one."""
        rows = vit_attention(layer, hidden).mean(1).mean(1)
        return rows[:, 1:] if self.config.vision_feature_select_strategy == "default" else rows

    def tiles_per_image(self, input_of):
        try:
            per_prompt = input_of("batch_num_images")
        except ValueError:  # not given: every image is encoded as a single-image prompt's
            per_prompt = None
        return tiles_per_image(self.config, input_of("image_sizes"), per_prompt)

    def pack_tiles(self, per_image, input_of, newline):
        packed, _ = self.entry_module().pack_image_features(
            list(per_image), input_of("image_sizes"), image_newline=newline,
            vision_aspect_ratio=self.config.vision_aspect_ratio,
        )
        return packed

    # -- the architecture numbers the FLOPs count needs ----------------------------------
    @classmethod
    def flops_layout(cls, config, text_hidden):
        """SigLIP tiles of ``(image_size / patch_size)^2`` tokens, no [CLS]; the projector runs
        on every tile's tokens before the pack step; by default the tokens and tiles of a
        :data:`TYPICAL_IMAGE` alone in its prompt."""
        vision = vit_flops_fields(getattr(config, "vision_config", None))
        if vision is None:
            return None
        per_tile = (vision["image_size"] // vision["patch_size"]) ** 2
        return dict(vision=vision, projector_dims=(vision["hidden_size"], text_hidden, text_hidden),
                    default_visual_tokens=packed_counts(config, [TYPICAL_IMAGE])[0], tokens_per_tile=per_tile,
                    max_tiles=cls.max_tiles(config, vision["image_size"]))


def tiles_per_image(config, image_sizes, batch_num_images=None) -> list[int]:
    """The tiles the vision tower encodes for each image, as ``get_image_features`` decides:
    the any-resolution tiles and the base tile for an image alone in its prompt, the base
    tile only for the images of a multi-image prompt."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches  # heavy: a modeling module, only when counting

    sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else [list(s) for s in image_sizes]
    if batch_num_images is None:
        alone = [True] * len(sizes)
    else:
        per_prompt = batch_num_images.tolist() if isinstance(batch_num_images, torch.Tensor) else batch_num_images
        alone = [int(n) == 1 for n in per_prompt for _ in range(int(n))]
    if len(alone) != len(sizes):
        raise ValueError(f"batch_num_images counts {len(alone)} images but image_sizes has {len(sizes)}")
    return [image_size_to_num_patches(image_size=s, grid_pinpoints=config.image_grid_pinpoints,
                                      patch_size=config.vision_config.image_size) if a else 1
            for s, a in zip(sizes, alone)]


def packed_counts(config, image_sizes, batch_num_images=None) -> list[int]:
    """Visual tokens of each image: the model's own pack step (which reads nothing but the
    config) run on one-channel zero maps of the encoded tiles."""
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel  # heavy: a modeling module, only when counting

    vc = config.vision_config
    per_tile = (vc.image_size // vc.patch_size) ** 2
    per_tile -= 1 if config.vision_feature_select_strategy == "default" else 0
    tiles = tiles_per_image(config, image_sizes, batch_num_images)
    # counting only: the pack step runs on CPU zero maps, whatever device the model is on
    if isinstance(image_sizes, torch.Tensor):
        image_sizes = image_sizes.cpu()
    maps = [torch.zeros(t, per_tile, 1, device="cpu") for t in tiles]
    _, lengths = LlavaOnevisionModel.pack_image_features(
        SimpleNamespace(config=config), maps, image_sizes, image_newline=torch.zeros(1, device="cpu"),
        vision_aspect_ratio=config.vision_aspect_ratio,
    )
    return [int(n) for n in lengths]
