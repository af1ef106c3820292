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


def __getattr__(name: str):  # PEP 562 lazy attributes: `import dop` loads no torch
    if name == "apply_policy":
        from .runtime import apply_policy  # heavy: the runtime loads torch

        return apply_policy
    if name == "count_flops":
        from .flops import count_flops  # heavy: counting reads adapters, which load torch

        return count_flops
    if name == "rank_visual_tokens":
        from .runtime import rank_visual_tokens  # heavy: the runtime loads torch

        return rank_visual_tokens
    raise AttributeError(f"module 'dop' has no attribute {name!r}")
