"""Adapter registry: one file per MLLM family, keyed by `config.model_type`.

The adapter is dop's one seam to transformers' internals (docs/design.md, "Model
families"). Adding a family is one new file that subclasses :class:`Adapter`, overrides what
differs from the defaults (image counts and grids, the vision tower's attention layer and
token scores, the FLOPs layout) and decorates it with :func:`register_adapter`, plus its
import below and its tests (tests/tiny_models.py builds each family from a config).
"""

from __future__ import annotations

from torch import nn

from .base import Adapter, ImageSpan
from .parts import LayerParts

_ADAPTERS: dict[str, type[Adapter]] = {}


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    for mt in cls.model_types:
        if mt in _ADAPTERS:
            raise ValueError(f"an adapter for model_type {mt!r} is already registered")
        _ADAPTERS[mt] = cls
    return cls


def known_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def _adapter_class(model_type: str) -> type[Adapter]:
    try:
        return _ADAPTERS[model_type]
    except KeyError:
        raise ValueError(
            f"unsupported model type {model_type!r}; supported: {', '.join(known_model_types())}"
        ) from None


def adapter_class_for_config(config) -> type[Adapter]:
    """The family's adapter class for a config; the base :class:`Adapter` (generic readings)
    for a model type without one."""
    return _ADAPTERS.get(getattr(config, "model_type", None), Adapter)


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for a loaded model (a `*ForConditionalGeneration` or its inner model)."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no .config; pass a transformers model")
    return _adapter_class(getattr(config, "model_type", None))(model)


def model_class_for(config) -> type:
    """The transformers class that loads a checkpoint of this config's family."""
    import transformers  # heavy: transformers, only to load a checkpoint

    cls = _adapter_class(getattr(config, "model_type", None))
    return getattr(transformers, cls.model_class_name)


from . import internvl, llava, llava_next, llava_onevision, qwen2_5_vl  # noqa: E402,F401  (registration)

__all__ = ["Adapter", "ImageSpan", "LayerParts", "adapter_class_for_config", "get_adapter", "model_class_for", "register_adapter", "known_model_types"]
