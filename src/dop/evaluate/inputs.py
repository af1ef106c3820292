"""Samples to model inputs: the one place that builds prompts, runs the processor and moves
the result onto the model (used by evaluation, the search and the main job)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .datasets import Sample


def sample_inputs(processor, build_prompt: Callable, samples: Sequence[Sample], param: torch.Tensor | None = None
                  ) -> tuple[dict, list[str]]:
    """Processor inputs of ``samples`` (one image and question each) and their prompts; on
    ``param``'s device and floating dtype when given. More than one prompt is padded on the
    left, as generation wants (docs/design.md, "Batches")."""
    images = [s.load_image() for s in samples]
    prompts = [build_prompt(processor, s.question) for s in samples]
    if len(samples) == 1:
        inputs = processor(images=images, text=prompts, return_tensors="pt")
    else:
        tokenizer = getattr(processor, "tokenizer", processor)
        side = getattr(tokenizer, "padding_side", "left")
        tokenizer.padding_side = "left"
        try:
            inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
        finally:
            tokenizer.padding_side = side
    return (dict(inputs) if param is None else on_model(inputs, param)), prompts


def on_model(inputs, param: torch.Tensor) -> dict:
    """``inputs`` with every tensor on ``param``'s device; floating tensors in its dtype."""
    return {
        k: (v.to(param.device, param.dtype) if torch.is_floating_point(v) else v.to(param.device))
        if isinstance(v, torch.Tensor) else v
        for k, v in inputs.items()
    }


def prompt_shape(adapter, inputs: dict) -> tuple[list[int], int]:
    """(visual tokens of each image, text tokens) of one prompt's inputs."""
    ids = inputs["input_ids"]
    counts = [sp.n for sp in adapter.image_spans(ids, inputs)]
    return counts, int(ids.shape[1]) - sum(counts)
