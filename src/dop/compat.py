"""The one place dop reaches into transformers' and torch's internals.

Everything here relies on something the libraries do not promise; each function says what.
When a release moves one of these, this file is what changes (tests/project/test_structure.py keeps
every such access here: private names of other libraries, the cache layers' counters, the
``modeling_<family>`` module of a class).
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any, Callable


# ---------------------------------------------------------------------- private internals
# (issue 23: the adapter seam; functions that read or call what transformers and torch keep
# private, used by the family adapters and the runtime)

def modeling_module(module) -> ModuleType:
    """The ``modeling_<family>`` module that defines ``module``'s class. Relies on transformers
    defining each family's functions (``apply_rotary_pos_emb``, ``eager_attention_forward``)
    beside its classes, in the module the class's ``__module__`` names."""
    return sys.modules[type(module).__module__]


def attention_implementation(config) -> str:
    """The attention backend a config selects (``eager``, ``sdpa``, ``flash_attention_2``...).
    Relies on ``PreTrainedConfig._attn_implementation``, which ``set_attn_implementation``
    updates in place (no public getter as of transformers 5.24)."""
    return config._attn_implementation


def forward_hooks(module) -> list[Callable]:
    """The forward hooks registered on ``module``, in call order. Relies on torch keeping them
    in ``nn.Module._forward_hooks`` (an ordered dict; no public accessor as of torch 2.13)."""
    return list(module._forward_hooks.values())


def attentions_requested(module) -> bool:
    """True when the model is collecting attention weights (``output_attentions=True``) and
    ``module`` is one it records them from. Relies on transformers recording them with forward
    hooks on the attention modules, and on ``transformers.utils.output_capturing._active_collector``
    (a context variable: the outputs being collected in this forward, or None)."""
    if not forward_hooks(module):
        return False
    try:
        from transformers.utils.output_capturing import _active_collector  # heavy: transformers, only when attentions are asked for
    except ImportError:  # another transformers layout: report whenever someone listens
        return True
    collected = _active_collector.get()
    return collected is not None and "attentions" in collected


def report_output(module, args: tuple, output: Any) -> None:
    """Call ``module``'s forward hooks with ``(args, output)`` as if its forward had returned
    ``output``: how a pruned layer hands its attention map to transformers' recording hooks.
    Relies on :func:`forward_hooks`, and on the hooks taking no keyword arguments."""
    for hook in forward_hooks(module):
        hook(module, args, output)


def default_store():
    """The default process group's key-value store (the rendezvous store under torchrun). Relies
    on ``torch.distributed.distributed_c10d._get_default_store`` (no public accessor as of torch
    2.13)."""
    from torch.distributed import distributed_c10d  # heavy: torch.distributed, only under torchrun

    return distributed_c10d._get_default_store()


def cache_layers(cache) -> list:
    """The per-layer objects of a transformers cache (``Cache.layers``; empty for a cache of
    another kind)."""
    return list(getattr(cache, "layers", None) or [])


def is_static_cache_layer(cache, layer_idx: int) -> bool:
    """True when the cache's layer ``layer_idx`` is a fixed-size (static) one. Relies on static
    cache layers, and only they, having a ``max_cache_len``."""
    layers = cache_layers(cache)
    return layer_idx < len(layers) and hasattr(layers[layer_idx], "max_cache_len")


def is_static_cache(cache) -> bool:
    """True when every layer of ``cache`` is static (see :func:`is_static_cache_layer`)."""
    layers = cache_layers(cache)
    return bool(layers) and all(hasattr(layer, "max_cache_len") for layer in layers)


def cache_batch_size(cache) -> int:
    """Batch rows of a cache that already holds entries (1 when none does). Relies on each cache
    layer keeping its keys as a (batch, heads, length, head_dim) tensor in ``keys``."""
    for layer in cache_layers(cache):
        keys = getattr(layer, "keys", None)
        if hasattr(keys, "dim") and keys.dim() == 4:
            return int(keys.shape[0])
    return 1


def static_cache_length(cache, layer_idx: int):
    """The number of columns a static cache layer holds, as the layer's own tensor counter (so a
    compiled decoding step reads it without a Python integer that changes every step). Relies on
    ``StaticLayer.cumulative_length``."""
    return cache_layers(cache)[layer_idx].cumulative_length
