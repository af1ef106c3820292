"""The parts of one decoder layer that dop recomputes, behind named methods (docs/design.md,
"Model families").

The pruned runtime (``dop.runtime.layer``) and the in-LLM rankers (``dop.rankers.common``)
run a decoder layer piece by piece on the rows they keep: the attention input norm, the
q/k/v/o projections, the family's rotary function and attention backend, the MLP with its
norm. :class:`LayerParts` is the one place that knows where those pieces sit in a layer; the
adapter of a family makes it (:meth:`dop.models.Adapter.layer_parts`), and a family whose
layer is laid out otherwise gives its own subclass there.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .. import compat

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def attention_module(layer: nn.Module) -> nn.Module:
    """The attention module of a pre-norm decoder layer; ValueError for another layout."""
    attn = getattr(layer, "self_attn", None)
    missing = [name for name in PROJECTIONS if not hasattr(attn, name)]
    if attn is None or missing:
        raise ValueError(
            f"{type(layer).__name__} has no self_attn.{'/'.join(missing or PROJECTIONS)}; "
            "this decoder layer layout is not supported"
        )
    return attn


class LayerParts:
    """A pre-norm Llama-style decoder layer: ``input_layernorm``, ``self_attn.{q,k,v,o}_proj``,
    ``post_attention_layernorm``, ``mlp``. Projections return flat rows (..., heads * head_dim);
    the caller lays them out per head."""

    def __init__(self, layer: nn.Module, rotary: Callable, eager: Callable | None):
        self.layer = layer
        self.attention = attention_module(layer)  # the module attention backends take (transformers' contract)
        self.rotary = rotary  # the family's apply_rotary_pos_emb(q, k, cos, sin)
        self.eager = eager  # the family's eager_attention_forward (None where it has none)

    # -- numbers of the attention ----------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.attention.head_dim

    @property
    def num_heads(self) -> int:
        return self.attention.config.num_attention_heads

    @property
    def scaling(self) -> float:
        return getattr(self.attention, "scaling", self.head_dim**-0.5)

    @property
    def sliding_window(self) -> int | None:
        return getattr(self.attention, "sliding_window", None)

    @property
    def implementation(self) -> str:
        """The attention backend, read at each call: ``set_attn_implementation`` may change it
        while a policy is applied."""
        return compat.attention_implementation(self.attention.config)

    # -- the computation -------------------------------------------------------------
    def attention_input(self, h: torch.Tensor) -> torch.Tensor:
        """The normalised input of the attention (``input_layernorm``)."""
        return self.layer.input_layernorm(h)

    def queries(self, hn: torch.Tensor) -> torch.Tensor:
        return self.attention.q_proj(hn)

    def keys(self, hn: torch.Tensor) -> torch.Tensor:
        return self.attention.k_proj(hn)

    def values(self, hn: torch.Tensor) -> torch.Tensor:
        return self.attention.v_proj(hn)

    def attention_output(self, x: torch.Tensor) -> torch.Tensor:
        """The output projection (``o_proj``) of the attention-weighted values."""
        return self.attention.o_proj(x)

    def mlp_update(self, h: torch.Tensor) -> torch.Tensor:
        """What the MLP adds to the residual stream ``h`` (``mlp(post_attention_layernorm(h))``)."""
        return self.layer.mlp(self.layer.post_attention_layernorm(h))

    # -- what transformers' recording hooks see --------------------------------------
    def attentions_requested(self) -> bool:
        """True when the model is collecting attention maps from this layer."""
        return compat.attentions_requested(self.attention)

    def report_attention(self, h: torch.Tensor, weights: torch.Tensor) -> None:
        """Hand an attention map (B, heads, queries, columns) to the hooks transformers
        records attentions with, as the attention module's own forward would."""
        compat.report_output(self.attention, (h,), (None, weights))
