"""Token pruners that decide inside the LLM: every token through the first ``K`` layers, ``k``
kept from layer ``K`` on; ``fastv`` (ranked by the last prompt token's attention in layer
``K``) and ``dart`` (duplication-aware selection at layer ``K``)."""

from __future__ import annotations

from ..search.cost import DEFAULT_CONVENTION
from .common import arch_of, budget_meta, count_or_budget, finish, register_baseline, solve_count, token_policy, visual_count


def in_llm(method, spec, model, tokens, budget, K, *, convention=DEFAULT_CONVENTION, visual_tokens=None,
            text_tokens=64):
    count_or_budget(tokens, budget)
    arch = arch_of(model)
    n, L = visual_count(arch, visual_tokens), arch.decoder.num_layers
    if not 1 <= K < L:
        raise ValueError(f"K: must lie in [1, {L - 1}] for a {L}-layer decoder, got {K}")
    budget, convention, extra = budget_meta(budget, arch, n, text_tokens, convention)
    make = lambda k: token_policy(L, n, k, K)  # noqa: E731
    k = int(tokens) if tokens is not None else solve_count(make, arch, n, budget, convention, text_tokens)
    extra.update(kept_tokens=k, prune_layer=K)
    return finish(make(k), spec, method, arch, n, text_tokens, extra)


# published: K=2; where that costs more than the budget even with no token kept, K=1
@register_baseline("fastv", options=("K",), tries=lambda L: [dict(K=min(2, L - 1)), dict(K=1)])
def fastv(model, tokens=None, budget=None, *, K: int = 2, **kw):
    """FastV: every token through K layers, ``tokens`` kept from layer K on (ranked by the
    last prompt token's attention in the K-th layer)."""
    return in_llm("fastv", f"fastv:K={K}", model, tokens, budget, K, **kw)


@register_baseline("dart", options=("K",), tries=lambda L: [dict(K=min(2, L - 1)), dict(K=1)])
def dart(model, tokens=None, budget=None, *, K: int = 2, pivots: int = 4, text_pivots: int = 4, **kw):
    """DART: every token through K layers, ``tokens`` kept from layer K on (duplication-aware)."""
    spec = f"dart:K={K}" + (f",pivots={pivots}" if pivots != 4 else "") + (f",text_pivots={text_pivots}" if text_pivots != 4 else "")
    return in_llm("dart", spec, model, tokens, budget, K, **kw)
