"""Token pruners that prune before the LLM (every op kind of a pruned token at depth 0):
``vispruner``, ``cdpruner``, ``random``, ``spatial``; groups ``[k/N, 1]``, depth ``[L, 0]``."""

from __future__ import annotations

from ..search.cost import DEFAULT_CONVENTION
from .common import arch_of, budget_meta, count_or_budget, finish, register_baseline, solve_count, token_policy, visual_count


def pre_llm(method: str, spec: str, model, tokens, budget, *, convention=DEFAULT_CONVENTION, visual_tokens=None,
            text_tokens=64):
    count_or_budget(tokens, budget)
    arch = arch_of(model)
    n, L = visual_count(arch, visual_tokens), arch.decoder.num_layers
    budget, convention, extra = budget_meta(budget, arch, n, text_tokens, convention)
    make = lambda k: token_policy(L, n, k, 0)  # noqa: E731
    k = int(tokens) if tokens is not None else solve_count(make, arch, n, budget, convention, text_tokens)
    extra.update(kept_tokens=k, prune_layer=0)
    return finish(make(k), spec, method, arch, n, text_tokens, extra)


@register_baseline("vispruner", options=("important_ratio",), prunes_before_llm=True)
def vispruner(model, tokens=None, budget=None, *, important_ratio: float = 0.5, **kw):
    """VisPruner: [CLS]-attention + diverse tokens, pruned before the LLM."""
    spec = "vispruner" if important_ratio == 0.5 else f"vispruner:important_ratio={important_ratio:g}"
    return pre_llm("vispruner", spec, model, tokens, budget, **kw)


@register_baseline("cdpruner", prunes_before_llm=True)
def cdpruner(model, tokens=None, budget=None, *, sign: int = 1, theta: float = 0.5, **kw):
    """CDPruner: conditional-DPP selection, pruned before the LLM."""
    opts = [f"sign={sign}"] if sign != 1 else []
    if theta != 0.5:
        opts.append(f"theta={theta:g}")
    return pre_llm("cdpruner", "cdpruner" + (":" + ",".join(opts) if opts else ""), model, tokens, budget, **kw)


@register_baseline("random", options=("seed",), prunes_before_llm=True)
def random(model, tokens=None, budget=None, *, seed: int = 0, **kw):
    """Random tokens (seeded), pruned before the LLM."""
    return pre_llm("random", f"random:seed={seed}", model, tokens, budget, **kw)


@register_baseline("spatial", prunes_before_llm=True)
def spatial(model, tokens=None, budget=None, **kw):
    """A uniform spatial stride, pruned before the LLM."""
    return pre_llm("spatial", "spatial", model, tokens, budget, **kw)
