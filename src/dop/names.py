"""Model names: what a name given to dop (``demo``, a hub id, a checkpoint folder) or a loaded
model's ``config._name_or_path`` refers to, compared one way everywhere."""

from __future__ import annotations

import os
from typing import Any

from .demo import DEMO_DIR

DEMO = "demo"  # the bundled demo model, as every command's --model accepts it


def loaded_model_name(model: Any) -> str | None:
    """The name a loaded model was loaded from (``config._name_or_path``), or None if unknown."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return name if isinstance(name, str) and name.strip() else None


def canonical_model_name(name: str | os.PathLike) -> str:
    """One spelling per model: ``demo`` and folders become their real path, hub ids lower case
    (the hub matches repository names without regard to case)."""
    text = os.fspath(name).strip()
    if text == DEMO:
        return os.path.realpath(DEMO_DIR)
    if os.path.isdir(text):
        return os.path.realpath(text)
    return text.rstrip("/").lower()


def same_model(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two model names refer to the same model (:func:`canonical_model_name`)."""
    return canonical_model_name(a) == canonical_model_name(b)
