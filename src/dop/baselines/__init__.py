"""Published token-pruning methods (the *baselines*) as dop policies (issue 4).

Each function returns ``(Policy, ranker_spec)`` for a model (preset name, checkpoint folder,
config or :class:`dop.flops.Arch`), either at an explicit kept-token count (``tokens``) or at
a FLOPs ``budget`` in the grammar of ``dop search`` (:func:`dop.search.cost.parse_budget`): a
fraction of the unpruned decoder's prefill FLOPs or absolute TFLOPs, both in ``convention``
(``"dop"`` by default, as in search), or ``"tokens:N"`` / ``"tokens:a/b"`` (always the paper
convention, as published tables count them); the kept count (or PDrop's ratio) is then the
largest that meets it, counted by :func:`dop.count_flops` like every other policy. The spec is also stored as the policy's
``ranker`` so that ``apply_policy`` / ``dop eval`` use it by default.

The baselines are one file each here, registered in :data:`BASELINES` (a new one is one new
file whose function carries ``@register_baseline(name, ...)``):

- ``vispruner``, ``cdpruner``, ``random``, ``spatial``: token pruning before the LLM (every op
  kind of a pruned token at depth 0): groups ``[k/N, 1]``, depth ``[L, 0]``.
- ``fastv``: all tokens through the first ``K`` layers, ``k`` from layer ``K`` on.
- ``dart``: as FastV, with DART's selection at layer ``K``.
- ``pdrop``: stages at ``layers`` keeping ``ratio**s`` of the tokens (:func:`pdrop_policy`).
"""

from __future__ import annotations

from .common import (
    BASELINES, Baseline, baseline, flops_fraction, register_baseline, resolve_budget, token_policy,
)
from .in_llm import dart, fastv
from .pdrop import pdrop
from .pre_llm import cdpruner, random, spatial, vispruner

METHODS = BASELINES  # the name of before: the baselines' names (``name in METHODS``, ``list(METHODS)``)

__all__ = ["BASELINES", "Baseline", "METHODS", "baseline", "cdpruner", "dart", "fastv", "flops_fraction", "pdrop",
           "random", "register_baseline", "resolve_budget", "spatial", "token_policy", "vispruner"]
