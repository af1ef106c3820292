"""What the runtime needs to know about an MLLM family, and nothing more.

An adapter hides where the decoder layers live, which input ids are visual, and how the
visual tokens of a prompt split into images. Core code never hard-codes a module path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ImageSpan:
    """The visual tokens of one image in the LLM's sequence."""

    positions: torch.Tensor  # LongTensor (n,) sequence positions, increasing
    grid: tuple[int, int] | None = None  # (rows, cols) when the tokens form a row-major grid

    @property
    def n(self) -> int:
        return int(self.positions.numel())


class Adapter:
    """Base adapter; a family subclasses it in `dop/models/<family>.py` and registers it."""

    model_types: tuple[str, ...] = ()
    model_class_name: str = ""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # -- where things are ------------------------------------------------------------
    def entry_module(self) -> nn.Module:
        """The module whose forward receives `input_ids` and the pixel inputs."""
        return getattr(self.model, "model", self.model)

    def language_model(self) -> nn.Module:
        return self.entry_module().language_model

    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model().layers

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers())

    @property
    def text_config(self):
        return getattr(self.config, "text_config", self.config)

    def vision_module(self) -> nn.Module | None:
        entry = self.entry_module()
        return getattr(entry, "vision_tower", None) or getattr(entry, "visual", None)

    # -- which tokens are visual -----------------------------------------------------
    @property
    def image_token_id(self) -> int:
        cfg = self.config
        for name in ("image_token_id", "image_token_index"):
            val = getattr(cfg, name, None)
            if val is not None:
                return int(val)
        raise ValueError(f"{type(cfg).__name__} has no image_token_id / image_token_index")

    def image_counts(self, inputs: dict) -> list[int] | None:
        """Visual tokens of each image, in order, when the family can tell from its inputs.
        None means: split the image tokens into contiguous runs, one image per run."""
        return None

    def image_grids(self, inputs: dict, counts: list[int]) -> list[tuple[int, int] | None]:
        """Row-major token grid of each image, or None where the layout is not a grid."""
        out = []
        for n in counts:
            r = int(round(n**0.5))
            out.append((r, r) if r * r == n else None)
        return out

    def image_spans(self, input_ids: torch.Tensor, inputs: dict) -> list[ImageSpan]:
        """Per image, the positions of its visual tokens in ``input_ids`` (batch of 1)."""
        ids = input_ids.reshape(-1)
        pos = torch.nonzero(ids == self.image_token_id).flatten()
        if pos.numel() == 0:
            return []
        counts = self.image_counts(inputs)
        if counts is None or sum(counts) != pos.numel():
            # contiguous runs of image tokens, one image per run
            breaks = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1
            edges = [0, *breaks.tolist(), pos.numel()]
            counts = [b - a for a, b in zip(edges[:-1], edges[1:])]
        chunks = torch.split(pos, counts)
        grids = self.image_grids(inputs, counts)
        return [ImageSpan(c, g) for c, g in zip(chunks, grids)]
