"""Run a model up to decoder layer k: the one place that stops a forward early (used by the
runtime's ranking and replay, and by the in-LLM rankers). A leaf: it needs torch and the
family adapter only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from . import get_adapter


@dataclass
class LayerInput:
    """What one decoder layer received: ``hidden_states`` and its keyword arguments
    (``position_embeddings`` in the per-token layout of ``Adapter.token_rope``)."""

    hidden: torch.Tensor
    kwargs: dict
    extra_args: tuple = ()  # positional arguments past hidden_states (none in transformers 5)


class _Stop(Exception):
    pass


def run_to_layers(model, inputs: dict, layers: Iterable[int], *, adapter=None, stop: bool = True,
                  observe: Callable[[int, LayerInput], None] | None = None, **forward_kwargs):
    """Run ``model(**inputs, use_cache=False)`` and record the input of each decoder layer in
    ``layers``; with ``stop`` (default) the forward ends at the last of them, before it runs.
    ``observe(i, input)`` is called as each is reached. Returns ``(inputs by layer, output)``;
    the output is None when the forward stopped."""
    adapter = adapter if adapter is not None else get_adapter(model)
    decoder = adapter.decoder_layers()
    wanted = sorted(set(int(i) for i in layers))
    if not wanted:
        raise ValueError("run_to_layers: no decoder layer to stop at")
    bad = [i for i in wanted if not 0 <= i < len(decoder)]
    if bad:
        raise ValueError(f"decoder layer(s) {bad} do not exist in a {len(decoder)}-layer decoder")
    seen: dict[int, LayerInput] = {}

    def hook(i):
        def pre(module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if "position_embeddings" in rest:  # one cos/sin row per token, whatever the version
                rest["position_embeddings"] = adapter.token_rope(rest["position_embeddings"])
            seen[i] = LayerInput(hidden, rest, tuple(args[1:]))
            if observe is not None:
                observe(i, seen[i])
            if stop and i == wanted[-1]:
                raise _Stop()
        return pre

    hooks = [decoder[i].register_forward_pre_hook(hook(i), with_kwargs=True) for i in wanted]
    try:
        out = model(**inputs, use_cache=False, **forward_kwargs)
    except _Stop:
        return seen, None
    finally:
        for h in hooks:
            h.remove()
    if stop:
        raise RuntimeError(f"the model finished without reaching decoder layer {wanted[-1]}")
    return seen, out


def decoder_input(model, inputs: dict, adapter=None) -> torch.Tensor:
    """Run the model (no gradients) up to its first decoder layer; that layer's input."""
    with torch.no_grad():
        seen, _ = run_to_layers(model, inputs, [0], adapter=adapter)
    return seen[0].hidden
