"""What dop needs to know about an MLLM family: the one seam to transformers' internals.

An adapter hides where the decoder layers live, which input ids are visual, how the visual
tokens of a prompt split into images, which of transformers' functions the family's
attention uses (rotary embedding, eager attention, the attention backend), the vision
tower's pieces the rankers read (the attention layer, the score of each LLM visual token),
and the architecture numbers the FLOPs count needs. The runtime, rankers and FLOPs code call
these methods and never look at ``model_type``, ``sys.modules`` or private attributes. The
parts of a decoder layer the runtime recomputes (norms, projections, MLP, rotary) and the
final norm are reached through :meth:`Adapter.layer_parts` and :meth:`Adapter.final_norm` too
(tests/project/test_structure.py checks that no code outside ``dop/models`` reads them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .. import compat
from .parts import LayerParts, attention_module

InputOf = Callable[[str], Any]  # a forward input by name (image_grid_thw, image_sizes), or a one-line error


@dataclass
class ImageSpan:
    """The visual tokens of one image in the LLM's sequence."""

    positions: torch.Tensor  # LongTensor (n,) sequence positions within its row, increasing
    grid: tuple[int, int] | None = None  # (rows, cols) when the tokens form a row-major grid
    row: int = 0  # the batch row (prompt) that holds the image
    index: int = 0  # the image's place among the images of its row

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

    def padded_position_ids(self, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """Position ids of a batch padded on the left, so that each prompt sees the positions
        it would alone (as ``generate`` computes them); None where the model derives its own
        from the attention mask."""
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    # -- transformers' functions of this family -----------------------------------------
    def rotary_function(self, attn: nn.Module) -> Callable:
        """The family's ``apply_rotary_pos_emb(q, k, cos, sin)`` used by decoder attention ``attn``."""
        return compat.modeling_module(attn).apply_rotary_pos_emb

    def token_rope(self, position_embeddings):
        """The decoder layers' ``(cos, sin)`` as one (batch, seq, head_dim) row per token, the
        layout the runtime gathers rows from; most families hand their layers exactly that."""
        return position_embeddings

    def layer_rope(self, position_embeddings):
        """``(cos, sin)`` as the family's own decoder layer expects it, from either its own
        layout or :meth:`token_rope`'s (the runtime may call a layer with either)."""
        return position_embeddings

    def eager_attention_function(self, attn: nn.Module) -> Callable | None:
        """The family's ``eager_attention_forward`` (None where the family has none)."""
        return getattr(compat.modeling_module(attn), "eager_attention_forward", None)

    # -- the parts of the language model the runtime recomputes --------------------------
    def layer_parts(self, layer_idx: int) -> LayerParts:
        """The parts of decoder layer ``layer_idx`` (norms, projections, MLP, the family's
        rotary and eager attention functions) behind named methods; a family whose layers are
        laid out otherwise returns its own :class:`LayerParts` subclass."""
        layer = self.decoder_layers()[layer_idx]
        attn = attention_module(layer)
        return LayerParts(layer, self.rotary_function(attn), self.eager_attention_function(attn))

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        """The language model's norm after its last decoder layer."""
        return self.language_model().norm(h)

    def output_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head on final-normed hidden states ``h``: logits (..., vocab)."""
        return self.model.get_output_embeddings()(h)

    # -- the vision tower's pieces the rankers read ---------------------------------------
    def vision_attention_layer(self) -> nn.Module:
        """The vision-tower layer whose attention ranks the visual tokens: for CLIP-like towers
        the layer whose output the projector reads (``vision_feature_layer``)."""
        tower = self.vision_module()
        return feature_layer(self.config, getattr(tower, "vision_model", tower).encoder.layers)

    def record_image_inputs(self, record: dict) -> list[Callable[[], Any]]:
        """Hooks that store in ``record`` the image inputs :meth:`vision_token_scores` needs
        when ``generate`` encodes the images in a forward other than the ranking one; returns
        the functions that remove them."""
        return []

    def vision_token_scores(self, layer: nn.Module, hidden: torch.Tensor, kwargs: dict, input_of: InputOf) -> torch.Tensor:
        """One attention score per LLM visual token (all images, in order) from the input
        ``hidden`` (and keyword arguments) of :meth:`vision_attention_layer`: for CLIP-like
        towers the [CLS] token's attention, heads averaged."""
        return cls_attention_rows(self.config, layer, hidden).reshape(-1)

    # -- the architecture numbers the FLOPs count needs ------------------------------------
    @classmethod
    def family_name(cls, config) -> str | None:
        return getattr(config, "model_type", None)

    @classmethod
    def flops_layout(cls, config, text_hidden: int) -> dict | None:
        """What ``dop.flops`` needs beyond the decoder, read from ``config``: ``vision`` (the
        fields of :class:`dop.flops.VisionArch`), ``projector_dims``, ``default_visual_tokens``,
        ``tokens_per_tile`` and ``max_tiles``; None when the config has no usable vision tower.
        The default reads a CLIP-like tower (fixed tiles) and LLaVA's projector."""
        vc = getattr(config, "vision_config", None)
        vision = vit_flops_fields(vc)
        if vision is None:
            return None
        layers = getattr(config, "vision_feature_layer", -2)
        n_feat = 1 if isinstance(layers, int) else len(layers)
        per_tile = (vision["image_size"] // vision["patch_size"]) ** 2
        per_tile += 1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else 0
        tiles = cls.max_tiles(config, vision["image_size"])
        return dict(vision=vision, projector_dims=(vision["hidden_size"] * n_feat, text_hidden, text_hidden),
                    default_visual_tokens=per_tile * tiles, tokens_per_tile=per_tile, max_tiles=tiles)

    @classmethod
    def max_tiles(cls, config, image_size: int) -> int:
        """The most vision tiles one image can take (1: a single fixed tile)."""
        return 1

    def input_embeddings(self) -> nn.Module:
        """The token embedding table of the language model."""
        return self.model.get_input_embeddings()

    def image_token_mask(self, input_ids: torch.Tensor | None, embeddings_of=None) -> torch.Tensor:
        """(B, S) bool: where the image tokens sit. From ``input_ids``, or, for a forward given
        ``inputs_embeds`` only, where those embeddings equal the image token's own embedding (the
        rule transformers itself applies to place the image features)."""
        if input_ids is not None:
            return input_ids == self.image_token_id
        if embeddings_of is None:
            raise ValueError("image positions need input_ids or inputs_embeds")
        embeds, table = embeddings_of
        token = torch.tensor([self.image_token_id], device=embeds.device)
        target = table(token).to(device=embeds.device, dtype=embeds.dtype)[0]
        mask = (embeds == target).all(-1)
        if not bool(mask.any()):
            raise ValueError(
                "dop cannot find the image positions in inputs_embeds (no row equals the image token's "
                "embedding); pass input_ids with the pixel values, or embeddings made by the model's own "
                "embedding table"
            )
        return mask

    def image_spans(self, input_ids: torch.Tensor | None, inputs: dict, embeddings_of=None) -> list[ImageSpan]:
        """Per image, over the batch (row-major), the positions of its visual tokens in its row."""
        mask = self.image_token_mask(input_ids, embeddings_of)
        if mask.dim() == 1:
            mask = mask[None]
        if not bool(mask.any()):
            return []
        counts = self.image_counts(inputs)
        per_row = [torch.nonzero(m).flatten() for m in mask]
        if counts is not None and sum(counts) == sum(int(p.numel()) for p in per_row):
            row_counts, start = [], 0
            for pos in per_row:  # the images of the batch, in order, fill the rows in order
                n, mine = int(pos.numel()), []
                while n > 0 and start < len(counts):
                    mine.append(counts[start])
                    n -= counts[start]
                    start += 1
                if n != 0:
                    row_counts = None
                    break
                row_counts.append(mine)
        else:
            row_counts = None
        if row_counts is None:  # contiguous runs of image tokens, one image per run
            row_counts = [_runs(pos) for pos in per_row]
        flat_counts = [c for rc in row_counts for c in rc]
        grids = self.image_grids(inputs, flat_counts)
        spans, k = [], 0
        for row, (pos, rc) in enumerate(zip(per_row, row_counts)):
            for i, chunk in enumerate(torch.split(pos, rc)):
                # counts that do not fit the inputs: no grid (the model itself reports the mismatch)
                spans.append(ImageSpan(chunk, grids[k] if k < len(grids) else None, row=row, index=i))
                k += 1
        return spans


def vision_layer_index(num_layers: int, feature_layer: int) -> int:
    """The encoder layer whose output is ``hidden_states[feature_layer]`` (transformers counts
    the embeddings as hidden_states[0]); its attention map is ``attentions[feature_layer]``
    for negative indices."""
    if feature_layer < 0:
        return num_layers + feature_layer
    if feature_layer == 0:
        raise ValueError("vision_feature_layer 0 is the embedding output: no attention map to rank by")
    return feature_layer - 1


def feature_layer(config, layers) -> nn.Module:
    """The layer of ``layers`` (a vision encoder's) whose output the projector reads
    (``config.vision_feature_layer``)."""
    f = getattr(config, "vision_feature_layer", -1)
    if not isinstance(f, int):
        raise ValueError(f"vispruner: a list vision_feature_layer ({f}) is not supported")
    return layers[vision_layer_index(len(layers), f)]


def softmax_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, H, S, S) attention probabilities, no mask, in float64."""
    return torch.softmax((q.double() @ k.double().transpose(-1, -2)) * scale, dim=-1)


def vit_attention(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """(tiles, H, S, S): the attention probabilities of a CLIP or SigLIP encoder layer,
    recomputed from the layer's input with its own norm and q/k projections."""
    attn = layer.self_attn
    hn = layer.layer_norm1(hidden)
    B, S, _ = hn.shape
    q = attn.q_proj(hn).view(B, S, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(hn).view(B, S, attn.num_heads, attn.head_dim).transpose(1, 2)
    return softmax_attention(q, k, attn.scale)


def cls_attention_rows(config, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """(tiles, tokens): a CLIP layer's [CLS] attention, heads averaged, over the tokens the
    projector reads."""
    rows = vit_attention(layer, hidden)[:, :, 0, :].mean(1)
    if getattr(config, "vision_feature_select_strategy", "default") == "default":
        rows = rows[:, 1:]
    return rows


def _side(x) -> int:
    if isinstance(x, (list, tuple)):
        if len(set(x)) != 1:
            raise ValueError(f"non-square image or patch size {x!r} is not supported")
        return int(x[0])
    return int(x)


CLS_TOWERS = ("clip_vision_model", "internvl_vision")  # vision towers that prepend a [CLS] token


def vit_flops_fields(vc) -> dict | None:
    """The :class:`dop.flops.VisionArch` fields of a fixed-tile ViT config (CLIP, SigLIP,
    InternViT); None when ``vc`` is not one."""
    if vc is None or not hasattr(vc, "num_hidden_layers") or not hasattr(vc, "image_size"):
        return None
    vtype = getattr(vc, "model_type", "") or ""
    return dict(
        type="vit", num_layers=int(vc.num_hidden_layers), hidden_size=int(vc.hidden_size),
        intermediate_size=int(vc.intermediate_size), num_heads=int(vc.num_attention_heads),
        patch_size=_side(vc.patch_size), image_size=_side(vc.image_size),
        in_channels=int(getattr(vc, "num_channels", 3)), cls_token=vtype in CLS_TOWERS, mlp_matrices=2, name=vtype,
    )


def _runs(pos: torch.Tensor) -> list[int]:
    """Lengths of the runs of consecutive positions in ``pos`` (increasing)."""
    if pos.numel() == 0:
        return []
    breaks = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1
    edges = [0, *breaks.tolist(), pos.numel()]
    return [b - a for a, b in zip(edges[:-1], edges[1:])]
