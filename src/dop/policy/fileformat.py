"""The policy file: JSON of format ``dop-policy/1`` (depth only) or ``dop-policy/2`` (depth
plus per-layer skips), read with limits and written atomically (docs/design.md, "Policies",
"Compatibility"). JSON only, never pickle.

The functions take the policy class (``cls``) or a policy, so this module needs nothing
from :mod:`dop.policy.core`; :class:`~dop.policy.Policy` exposes them as its methods.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..jsonio import json_text, write_text_atomic
from .errors import PolicyError
from .schema import check_kinds

FORMAT = "dop-policy/1"  # depth only; what every policy without skips writes, byte for byte
FORMAT_SKIP = "dop-policy/2"  # depth plus per-layer skips (docs/design.md, "Per-layer skips")
FORMATS = (FORMAT, FORMAT_SKIP)
FIELDS = ("format", "num_layers", "groups", "depth", "skip", "ranker", "meta")
POLICY_FILE = "dop_policy.json"  # beside a checkpoint's config.json (Policy.save_pretrained)
MAX_POLICY_BYTES = 1 << 20  # a policy is a few hundred bytes; a bigger file is not one
MAX_NESTING = 32  # JSON nesting depth of a policy file (meta included)


def nesting_depth(text: str) -> int:
    """The deepest bracket nesting of JSON ``text`` (brackets inside strings not counted),
    found without parsing, so a deeply nested file never reaches the recursive parser."""
    depth = deepest = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def policy_from_dict(cls: type, data: Any) -> Any:
    """A ``cls`` (a :class:`~dop.policy.Policy`) from the parsed JSON object of a policy file."""
    if not isinstance(data, dict):
        raise PolicyError(f"policy: must be a JSON object, got {type(data).__name__}")
    fmt = data.get("format")
    if fmt is None:
        raise PolicyError(f"format: missing; expected {FORMAT!r} or {FORMAT_SKIP!r}")
    if fmt not in FORMATS:
        raise PolicyError(f"format: unknown format {fmt!r}; expected {FORMAT!r} or {FORMAT_SKIP!r}")
    if "skip" in data and fmt == FORMAT:
        raise PolicyError(f"skip: per-layer skips need \"format\": {FORMAT_SKIP!r}, the file says {fmt!r}")
    for req in ("num_layers", "groups"):
        if req not in data:
            raise PolicyError(f"{req}: missing (required)")
    unknown = set(data) - set(FIELDS)
    if unknown:
        raise PolicyError(f"policy: unknown field(s) {', '.join(sorted(unknown))}")
    depth, skip = data.get("depth", {}), data.get("skip", {})
    check_kinds(depth, "depth")
    check_kinds(skip, "skip")
    meta = data.get("meta")
    return cls(
        num_layers=data["num_layers"],
        groups=data["groups"],
        depth=depth,
        ranker=data.get("ranker"),
        meta={} if meta is None else meta,
        skip=skip,
    )


def _read_text(path_or_text: str | os.PathLike) -> tuple[str, str]:
    """``(text, where)``: the JSON text of a policy file path (or of a JSON string starting
    with ``{``) and how errors name it; refuses what cannot be a policy before parsing."""
    text = str(path_or_text)
    if not text.lstrip().startswith("{"):
        path = os.fspath(path_or_text)
        if not os.path.exists(path):
            raise PolicyError(f"policy file {path!r}: no such file")
        where = f"policy file {path!r}"
        if os.path.isdir(path):
            raise PolicyError(f"{where}: is a folder, not a file")
        try:
            with open(path, "rb") as fh:
                raw = fh.read(MAX_POLICY_BYTES + 1)
        except OSError as e:
            raise PolicyError(f"{where}: cannot read ({e.strerror or e})") from None
        if len(raw) > MAX_POLICY_BYTES:
            raise PolicyError(f"{where}: larger than {MAX_POLICY_BYTES} bytes; not a policy file")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise PolicyError(f"{where}: not valid JSON (not UTF-8 text; policies are JSON, never pickle)") from None
    else:
        where = "policy JSON"
        if len(text) > MAX_POLICY_BYTES:
            raise PolicyError(f"{where}: longer than {MAX_POLICY_BYTES} characters; not a policy")
    if not text.strip():
        raise PolicyError(f"{where}: empty file")
    return text, where


def policy_from_json(cls: type, path_or_text: str | os.PathLike) -> Any:
    """A ``cls`` from a file path (or a JSON string starting with ``{``); errors name the file."""
    text, where = _read_text(path_or_text)
    depth = nesting_depth(text)
    if depth > MAX_NESTING:
        raise PolicyError(f"{where}: JSON nested {depth} levels deep (a policy needs at most {MAX_NESTING})")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PolicyError(f"{where}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except RecursionError:  # unreachable after the depth check; kept as a guard
        raise PolicyError(f"{where}: JSON nested too deeply") from None
    try:
        return policy_from_dict(cls, data)
    except PolicyError as e:
        raise PolicyError(f"{where}: {e}") from None


def policy_to_dict(policy: Any) -> dict[str, Any]:
    """The JSON object of ``policy``: format 1 unless it has per-layer skips, fields in file order."""
    out: dict[str, Any] = {
        "format": FORMAT_SKIP if policy.skip else FORMAT,
        "num_layers": policy.num_layers,
        "groups": list(policy.groups),
        "depth": {k: list(v) for k, v in policy.depth.items()},
    }
    if policy.skip:
        out["skip"] = {k: [list(ls) for ls in v] for k, v in policy.skip.items()}
    if policy.ranker is not None:
        out["ranker"] = policy.ranker
    out["meta"] = dict(policy.meta)
    return out


def policy_to_json(policy: Any, path: str | os.PathLike | None = None) -> str:
    """The JSON text of ``policy``, written atomically to ``path`` when given."""
    text = json_text(policy_to_dict(policy))
    if path is not None:  # like open(path, "w"): a missing folder is an error, not created
        write_text_atomic(path, text, make_folder=False)
    return text


def checkpoint_policy_path(model_dir: str | os.PathLike, *, must_exist: bool) -> str:
    """``model_dir/dop_policy.json``; the folder (``must_exist=False``: for writing) or the
    file (``must_exist=True``: for reading) must exist."""
    folder = os.fspath(model_dir)
    path = os.path.join(folder, POLICY_FILE)
    if not must_exist and not os.path.isdir(folder):
        raise PolicyError(f"checkpoint folder {folder!r}: no such folder")
    if must_exist and not os.path.isfile(path):
        raise PolicyError(f"checkpoint folder {folder!r}: no {POLICY_FILE} (save one with Policy.save_pretrained)")
    return path


def save_policy(policy: Any, model_dir: str | os.PathLike) -> str:
    """``policy.save_pretrained(model_dir)``: ``dop_policy.json`` beside the checkpoint's config."""
    return policy.save_pretrained(model_dir)
