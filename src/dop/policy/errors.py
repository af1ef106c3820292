"""The exception and warnings a policy raises (docs/design.md, "Policies")."""

from __future__ import annotations


class PolicyError(ValueError):
    """A policy (or policy file) breaks a rule of docs/design.md, "Policies"."""


class ModelMismatchWarning(UserWarning):
    """A policy is applied to a model other than the one it records (``meta["model"]``)."""


class TransferWarning(UserWarning):
    """Rescaling a policy to another depth merged two distinct depths."""
