from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..flops import Arch, arch_from_config, budget_from_tokens, count_flops, resolve_arch
from ..names import is_hub_id
from ..policy import Policy
from ..registry import Registry
from ..search.cost import DEFAULT_CONVENTION, largest_fitting, parse_budget



@dataclass(frozen=True)
class Baseline:
    """A published token pruner as :data:`BASELINES` holds it.

    ``build(model, tokens=None, budget=None, **options)`` returns ``(Policy, ranker spec)``;
    ``options`` are the `dop baseline` options it takes (argparse names, also its keyword
    names); ``counts_tokens``: whether it keeps a token count (``--tokens``) rather than a
    ratio; ``prunes_before_llm``: every op of a pruned token at depth 0, so its cost is
    that of keeping N tokens; ``tries(L)``: the stage settings `dop run` tries in turn at a
    budget for an L-layer model, the published ones first (an earlier stage where that
    costs more than the budget even with no token kept)."""

    name: str
    build: Callable[..., tuple[Policy, str]]
    options: tuple[str, ...] = ()
    counts_tokens: bool = True
    prunes_before_llm: bool = False
    tries: Callable[[int], list[dict]] = lambda num_layers: [{}]


# name -> Baseline; every module of dop.baselines registers its own (register_baseline)
BASELINES: Registry[Baseline] = Registry("baseline", package="dop.baselines")


def register_baseline(name: str, **spec):
    """``@register_baseline("fastv", options=("K",), tries=...)`` above a baseline's function."""
    def add(fn):
        BASELINES.register(name, Baseline(name, fn, **spec))
        return fn
    return add


def baseline(method: str, model, **kwargs) -> tuple[Policy, str]:
    """Dispatch by method name (one of :data:`BASELINES`)."""
    return BASELINES.get(method).build(model, **kwargs)


def arch_of(model: Any) -> Arch:
    if isinstance(model, str) and is_hub_id(model):
        try:
            return resolve_arch(model)
        except ValueError:  # a hub id: read its config only
            from transformers import AutoConfig  # heavy: transformers, only for a hub id that is no preset

            return arch_from_config(AutoConfig.from_pretrained(model), name=model)
    return resolve_arch(model)


def token_policy(num_layers: int, n: int, k: int, depth: int = 0) -> Policy:
    """Keep ``k`` of ``n`` visual tokens in every op from layer ``depth`` on (all before):
    :meth:`Policy.token_pruning` at ``k / n``."""
    if not 0 <= k <= n:
        raise ValueError(f"tokens: must lie in [0, {n}], got {k}")
    # floor(k/n * n + 1e-9) == k (docs/design.md, "Policies"), whatever the rounding of k/n
    return Policy.token_pruning(num_layers, k / n if n else 1.0, depth)


def flops_fraction(arch: Arch, policy: Policy, n: int, convention: str = "paper", text_tokens: int = 64) -> float:
    rep = count_flops(arch, policy, num_visual_tokens=n, num_text_tokens=text_tokens, convention=convention)
    return rep.decoder / rep.decoder_unpruned if rep.decoder_unpruned else 1.0


def solve_count(make: Callable[[int], Policy], arch, n, budget, convention, text_tokens) -> int:
    """Largest k in [0, n] whose policy costs at most ``budget`` (monotone in k)."""
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget: a fraction of the unpruned decoder FLOPs in (0, 1], got {budget}")
    k = largest_fitting(lambda k: flops_fraction(arch, make(k), n, convention, text_tokens) <= budget + 1e-12, n)
    if k is None:
        low = flops_fraction(arch, make(0), n, convention, text_tokens)
        raise ValueError(
            f"budget {budget:g} is below what this method costs with no visual token kept "
            f"({low:.4f} of the unpruned decoder, {convention} convention)"
        )
    return k


def finish(policy: Policy, spec: str, method: str, arch: Arch, n: int, text_tokens: int, extra: dict) -> tuple[Policy, str]:
    meta = {"method": method, "model": arch.hub_id or arch.name, "visual_tokens": n}
    meta.update(extra)
    meta["flops_fraction"] = {c: round(flops_fraction(arch, policy, n, c, text_tokens), 6) for c in ("paper", "dop")}
    meta["flops_text_tokens"] = text_tokens
    return policy.replace(ranker=spec, meta=meta), spec


def visual_count(arch: Arch, visual_tokens: int | None) -> int:
    n = visual_tokens if visual_tokens is not None else arch.default_visual_tokens
    if n is None:
        raise ValueError(f"{arch.name}: no default visual-token count; pass visual_tokens")
    return int(n)


def count_or_budget(tokens, budget):
    if (tokens is None) == (budget is None):
        raise ValueError("give exactly one of tokens (kept visual tokens) or budget (FLOPs fraction)")


def resolve_budget(budget, model, visual_tokens: int | None = None, text_tokens: int = 64,
                   convention: str = DEFAULT_CONVENTION) -> tuple[float, str, int | None]:
    """``(fraction of the unpruned decoder, its convention, tokens or None)`` for a budget in
    ``dop search``'s grammar: a fraction (``0.14``, ``"14%"``) or ``"2.5T"`` in ``convention``,
    ``"tokens:64"`` / ``"tokens:1/9"`` in the paper convention."""

    if convention not in ("dop", "paper"):
        raise ValueError(f"convention must be 'dop' or 'paper', got {convention!r}")
    b = parse_budget(budget)
    arch = arch_of(model)
    n = visual_count(arch, visual_tokens)
    if b.kind == "tokens":
        k = b.tokens(n)
        return budget_from_tokens(arch, k, n), "paper", k
    if b.kind == "tflops":
        full = count_flops(arch, None, num_visual_tokens=n, num_text_tokens=text_tokens, convention=convention).decoder
        frac = b.value * 1e12 / full
        if frac > 1.0:
            frac = 1.0  # at or above the unpruned cost: the method keeps every token
        return frac, convention, None
    return b.value, convention, None


def budget_meta(budget, arch, n, text_tokens, convention):
    """``budget`` (None, a fraction or a budget spec) as ``(fraction or None, convention, extra meta)``."""
    if budget is None:
        return None, convention, {}
    spec = budget
    frac, conv, k = resolve_budget(budget, arch, n, text_tokens, convention)
    extra = {"budget": frac, "budget_convention": conv}
    if isinstance(spec, str):
        extra["budget_spec"] = spec
    if k is not None:
        extra["budget_tokens"] = k
    return frac, conv, extra


