"""Operation-pruning policies (docs/design.md, "Policies"): the :class:`Policy` data type and
its checks, the policy file (``dop-policy/1`` and ``/2``), transfer to another layer count and
the one-line summary, one module each; every public name is importable from here.
"""

from __future__ import annotations

from .core import Policy
from .errors import ModelMismatchWarning, PolicyError, TransferWarning
from .fileformat import FORMAT, FORMAT_SKIP, FORMATS, MAX_NESTING, MAX_POLICY_BYTES, POLICY_FILE, save_policy
from .schema import KEYS, MAX_LAYERS, OP_KINDS
from .transfer import transfer_depth, transfer_layer

__all__ = [
    "FORMAT",
    "FORMATS",
    "FORMAT_SKIP",
    "KEYS",
    "MAX_LAYERS",
    "MAX_NESTING",
    "MAX_POLICY_BYTES",
    "ModelMismatchWarning",
    "OP_KINDS",
    "POLICY_FILE",
    "Policy",
    "PolicyError",
    "TransferWarning",
    "save_policy",
    "transfer_depth",
    "transfer_layer",
]
