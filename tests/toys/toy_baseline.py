"""A toy token-pruning baseline in one file: the top tokens of a uniform spatial stride kept,
pruned before the LLM."""

from __future__ import annotations

from dop.baselines.common import register_baseline
from dop.baselines.pre_llm import pre_llm


@register_baseline("toy_baseline", prunes_before_llm=True)
def toy_baseline(model, tokens=None, budget=None, **kw):
    return pre_llm("toy_baseline", "spatial", model, tokens, budget, **kw)
