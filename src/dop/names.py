"""Model names: what a name given to dop (``demo``, a hub id, a checkpoint folder) or a loaded
model's ``config.name_or_path`` refers to, compared one way everywhere."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .demo import DEMOS, demo_dir

DEMO = "demo"  # the bundled demo model, as every command's --model accepts it
DEMO_BASE = "demo-base"  # its from-scratch control, before the pruning fine-tunes
# "owner/name" as the hub spells repository ids
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_hub_id(name: str | os.PathLike) -> bool:
    """Whether ``name`` is spelled as a hub repository id (``owner/name``) and names no local
    file or folder."""
    text = os.fspath(name)
    return bool(HUB_ID.match(text)) and not os.path.exists(text)


def looks_like_path(name: str | os.PathLike) -> bool:
    """Whether ``name`` was meant as a local path (absolute, relative with ``.`` or ``~``, or
    with more parts than a hub id), so that a missing one is reported as a missing folder."""
    text = os.fspath(name)
    return text.startswith(("/", ".", "~")) or text.count("/") > 1 or (os.sep != "/" and os.sep in text)


def bundled_dir(name: str | os.PathLike) -> Path | None:
    """The weights folder of a bundled demo model's name (``demo``, ``demo-base``), else None."""
    text = os.fspath(name).strip() if isinstance(name, (str, os.PathLike)) else None
    return demo_dir(text) if text in DEMOS else None


def loaded_model_name(model: Any) -> str | None:
    """The name a loaded model was loaded from (``config.name_or_path``), or None if unknown."""
    name = getattr(getattr(model, "config", None), "name_or_path", None)
    return name if isinstance(name, str) and name.strip() else None


def canonical_model_name(name: str | os.PathLike) -> str:
    """One spelling per model: ``demo`` and folders become their real path, hub ids lower case
    (the hub matches repository names without regard to case)."""
    text = os.fspath(name).strip()
    if bundled_dir(text) is not None:
        return os.path.realpath(bundled_dir(text))
    if os.path.isdir(text):
        return os.path.realpath(text)
    return text.rstrip("/").lower()


def same_model(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two model names refer to the same model (:func:`canonical_model_name`)."""
    return canonical_model_name(a) == canonical_model_name(b)
