"""Atomic JSON output: a temporary file in the same folder, fsync, then a rename, so a
crash or an error never leaves a half-written file behind. The file gets the mode the
user's umask gives a new file (issue 16: stage files were 0600, the rest 0644)."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from .outputs import user_file_mode


def json_default(obj):
    """``json.dumps``' ``default``: an object's ``to_dict()``, an array's ``tolist()``."""
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def json_text(data: Any, *, indent: int = 2) -> str:
    """``data`` as strict JSON text (no NaN), one trailing newline: what every writer writes."""
    return json.dumps(data, indent=indent, allow_nan=False, default=json_default) + "\n"


def write_json_atomic(path: str | os.PathLike, data: Any, *, indent: int = 2) -> None:
    """Write ``data`` as JSON to ``path`` (creating its folder) through a temporary file."""
    write_text_atomic(path, json_text(data, indent=indent))


def write_text_atomic(path: str | os.PathLike, text: str, *, make_folder: bool = True) -> None:
    """Write ``text`` to ``path``: temporary file, fsync, rename. The folder is created unless
    ``make_folder`` is False (then a missing folder is the caller's error, as with ``open``)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if make_folder:
        os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, user_file_mode())  # mkstemp makes 0600; outputs follow the umask like any file
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
