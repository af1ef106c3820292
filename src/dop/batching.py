"""Batches of single-prompt model inputs (docs/design.md, "Batches").

:func:`collate` pads prompts made one at a time by a processor into one batch, the way the
processor itself pads: token-level tensors (``input_ids``, ``attention_mask``, ...) padded on
the left (as generation wants) with the pad id and mask 0, every other tensor (pixel values,
image sizes and grids) concatenated along its first axis in prompt order, which is the order
in which the model consumes the images.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .models import get_adapter

TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


def pad_token_id(model) -> int:
    """The id a batch pads its prompts with (it is never attended to)."""
    for cfg in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        pad = getattr(cfg, "pad_token_id", None) if cfg is not None else None
        if isinstance(pad, int):
            return pad
    return 0


def collate(prompts: Sequence[dict], pad_id: int = 0, side: str = "left") -> dict:
    """One padded batch from single-prompt inputs (each with a batch axis of 1)."""
    if not prompts:
        raise ValueError("collate: no prompts")
    if side not in ("left", "right"):
        raise ValueError(f"collate: side must be 'left' or 'right', got {side!r}")
    if len(prompts) == 1:
        return dict(prompts[0])
    width = max(int(p["input_ids"].shape[1]) for p in prompts)
    out: dict = {}
    keys = list(dict.fromkeys(k for p in prompts for k, v in p.items() if isinstance(v, torch.Tensor)))
    for key in keys:
        parts = [p[key] for p in prompts if p.get(key) is not None]
        if key in TOKEN_KEYS:
            fill = pad_id if key == "input_ids" else 0
            rows = []
            for t in parts:
                pad = torch.full((t.shape[0], width - t.shape[1]), fill, dtype=t.dtype, device=t.device)
                rows.append(torch.cat([pad, t] if side == "left" else [t, pad], dim=1))
            out[key] = torch.cat(rows)
        else:
            out[key] = torch.cat(parts)
    if "attention_mask" not in out:
        mask = [torch.ones_like(p["input_ids"]) for p in prompts]
        out["attention_mask"] = collate([{"input_ids": m} for m in mask], 0, side)["input_ids"]
    return out


def collated(model, prompts: Sequence[dict]) -> dict:
    """Prompts padded on the left into one batch, with the position ids of padded rows for
    families that need them (docs/design.md, "Batches")."""
    inputs = collate(list(prompts), pad_token_id(model))
    if len(prompts) > 1:
        pos = get_adapter(model).padded_position_ids(inputs["attention_mask"])
        if pos is not None:
            inputs["position_ids"] = pos
    return inputs
