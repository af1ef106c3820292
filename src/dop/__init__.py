"""dop: Depth-wise Operation Pruning for multimodal LLMs (arXiv 2507.02909).

Public API::

    from dop import Policy, apply_policy, count_flops
"""

from __future__ import annotations

from .policy import ModelMismatchWarning, Policy, PolicyError, save_policy

__version__ = "0.1.0"

__all__ = [
    "Policy",
    "PolicyError",
    "ModelMismatchWarning",
    "save_policy",
    "apply_policy",
    "count_flops",
    "rank_visual_tokens",
    "__version__",
]


def __getattr__(name: str):  # lazy: keep `import dop` light (no torch until needed)
    if name == "apply_policy":
        from .runtime import apply_policy  # lazy attribute: importing the package loads no torch

        return apply_policy
    if name == "count_flops":
        from .flops import count_flops  # lazy attribute: importing the package loads no torch

        return count_flops
    if name == "rank_visual_tokens":
        from .runtime import rank_visual_tokens  # lazy attribute: importing the package loads no torch

        return rank_visual_tokens
    raise AttributeError(f"module 'dop' has no attribute {name!r}")
