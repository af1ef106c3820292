"""Published token-pruning methods as dop policies (issue 4).

Each function returns ``(Policy, ranker_spec)`` for a model (preset name, checkpoint folder,
config or :class:`dop.flops.Arch`), either at an explicit kept-token count (``tokens``) or at
a FLOPs ``budget`` in the grammar of ``dop search`` (:func:`dop.search.cost.parse_budget`): a
fraction of the unpruned decoder's prefill FLOPs or absolute TFLOPs, both in ``convention``
(``"dop"`` by default, as in search), or ``"tokens:N"`` / ``"tokens:a/b"`` (always the paper
convention, as published tables count them); the kept count (or PDrop's ratio) is then the
largest that meets it, counted by :func:`dop.count_flops` like every other policy. The spec is also stored as the policy's
``ranker`` so that ``apply_policy`` / ``dop eval`` use it by default.

- ``vispruner``, ``cdpruner``, ``random``, ``spatial``: token pruning before the LLM (every op
  kind of a pruned token at depth 0): groups ``[k/N, 1]``, depth ``[L, 0]``.
- ``fastv``: all tokens through the first ``K`` layers, ``k`` from layer ``K`` on.
- ``dart``: as FastV, with DART's selection at layer ``K``.
- ``pdrop``: stages at ``layers`` keeping ``ratio**s`` of the tokens (:func:`pdrop_policy`).
"""

from __future__ import annotations

from typing import Any, Callable

from .flops import Arch, arch_from_config, budget_from_tokens, count_flops, resolve_arch
from .names import is_hub_id
from .policy import Policy
from .rankers.pdrop import default_stage_layers, parse_layers, pdrop_policy
from .search.cost import DEFAULT_CONVENTION, parse_budget

METHODS = ("vispruner", "cdpruner", "random", "spatial", "fastv", "pdrop", "dart")


def _arch(model: Any) -> Arch:
    if isinstance(model, str) and is_hub_id(model):
        try:
            return resolve_arch(model)
        except ValueError:  # a hub id: read its config only
            from transformers import AutoConfig  # lazy: only for a hub id that is no preset

            return arch_from_config(AutoConfig.from_pretrained(model), name=model)
    return resolve_arch(model)


def token_policy(num_layers: int, n: int, k: int, depth: int = 0) -> Policy:
    """Keep ``k`` of ``n`` visual tokens in every op from layer ``depth`` on (all before)."""
    if not 0 <= k <= n:
        raise ValueError(f"tokens: must lie in [0, {n}], got {k}")
    if k == n:
        return Policy.unpruned(num_layers)
    if k == 0:
        return Policy(num_layers, [1.0], {"attn": [depth], "mlp": [depth]})
    # floor(k/n * n + 1e-9) == k (docs/design.md, "Policies"), whatever the rounding of k/n
    return Policy(num_layers, [k / n, 1.0], {"attn": [num_layers, depth], "mlp": [num_layers, depth]})


def flops_fraction(arch: Arch, policy: Policy, n: int, convention: str = "paper", text_tokens: int = 64) -> float:
    rep = count_flops(arch, policy, num_visual_tokens=n, num_text_tokens=text_tokens, convention=convention)
    return rep.decoder / rep.decoder_unpruned if rep.decoder_unpruned else 1.0


def _solve_count(make: Callable[[int], Policy], arch, n, budget, convention, text_tokens) -> int:
    """Largest k in [0, n] whose policy costs at most ``budget`` (monotone in k: bisection)."""
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget: a fraction of the unpruned decoder FLOPs in (0, 1], got {budget}")
    fits = lambda k: flops_fraction(arch, make(k), n, convention, text_tokens) <= budget + 1e-12  # noqa: E731
    if not fits(0):
        low = flops_fraction(arch, make(0), n, convention, text_tokens)
        raise ValueError(
            f"budget {budget:g} is below what this method costs with no visual token kept "
            f"({low:.4f} of the unpruned decoder, {convention} convention)"
        )
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _finish(policy: Policy, spec: str, method: str, arch: Arch, n: int, text_tokens: int, extra: dict) -> tuple[Policy, str]:
    meta = {"method": method, "model": arch.hub_id or arch.name, "visual_tokens": n}
    meta.update(extra)
    meta["flops_fraction"] = {c: round(flops_fraction(arch, policy, n, c, text_tokens), 6) for c in ("paper", "dop")}
    meta["flops_text_tokens"] = text_tokens
    return policy.replace(ranker=spec, meta=meta), spec


def _visual(arch: Arch, visual_tokens: int | None) -> int:
    n = visual_tokens if visual_tokens is not None else arch.default_visual_tokens
    if n is None:
        raise ValueError(f"{arch.name}: no default visual-token count; pass visual_tokens")
    return int(n)


def _count_or_budget(tokens, budget):
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
    arch = _arch(model)
    n = _visual(arch, visual_tokens)
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


def _budget(budget, arch, n, text_tokens, convention):
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


def _pre_llm(method: str, spec: str, model, tokens, budget, *, convention=DEFAULT_CONVENTION, visual_tokens=None,
            text_tokens=64):
    _count_or_budget(tokens, budget)
    arch = _arch(model)
    n, L = _visual(arch, visual_tokens), arch.decoder.num_layers
    budget, convention, extra = _budget(budget, arch, n, text_tokens, convention)
    make = lambda k: token_policy(L, n, k, 0)  # noqa: E731
    k = int(tokens) if tokens is not None else _solve_count(make, arch, n, budget, convention, text_tokens)
    extra.update(kept_tokens=k, prune_layer=0)
    return _finish(make(k), spec, method, arch, n, text_tokens, extra)


def vispruner(model, tokens=None, budget=None, *, important_ratio: float = 0.5, **kw):
    """VisPruner: [CLS]-attention + diverse tokens, pruned before the LLM."""
    spec = "vispruner" if important_ratio == 0.5 else f"vispruner:important_ratio={important_ratio:g}"
    return _pre_llm("vispruner", spec, model, tokens, budget, **kw)


def cdpruner(model, tokens=None, budget=None, *, sign: int = 1, theta: float = 0.5, **kw):
    """CDPruner: conditional-DPP selection, pruned before the LLM."""
    opts = [f"sign={sign}"] if sign != 1 else []
    if theta != 0.5:
        opts.append(f"theta={theta:g}")
    return _pre_llm("cdpruner", "cdpruner" + (":" + ",".join(opts) if opts else ""), model, tokens, budget, **kw)


def random(model, tokens=None, budget=None, *, seed: int = 0, **kw):
    """Random tokens (seeded), pruned before the LLM."""
    return _pre_llm("random", f"random:seed={seed}", model, tokens, budget, **kw)


def spatial(model, tokens=None, budget=None, **kw):
    """A uniform spatial stride, pruned before the LLM."""
    return _pre_llm("spatial", "spatial", model, tokens, budget, **kw)


def _in_llm(method, spec, model, tokens, budget, K, *, convention=DEFAULT_CONVENTION, visual_tokens=None,
            text_tokens=64):
    _count_or_budget(tokens, budget)
    arch = _arch(model)
    n, L = _visual(arch, visual_tokens), arch.decoder.num_layers
    if not 1 <= K < L:
        raise ValueError(f"K: must lie in [1, {L - 1}] for a {L}-layer decoder, got {K}")
    budget, convention, extra = _budget(budget, arch, n, text_tokens, convention)
    make = lambda k: token_policy(L, n, k, K)  # noqa: E731
    k = int(tokens) if tokens is not None else _solve_count(make, arch, n, budget, convention, text_tokens)
    extra.update(kept_tokens=k, prune_layer=K)
    return _finish(make(k), spec, method, arch, n, text_tokens, extra)


def fastv(model, tokens=None, budget=None, *, K: int = 2, **kw):
    """FastV: every token through K layers, ``tokens`` kept from layer K on (ranked by the
    last prompt token's attention in the K-th layer)."""
    return _in_llm("fastv", f"fastv:K={K}", model, tokens, budget, K, **kw)


def dart(model, tokens=None, budget=None, *, K: int = 2, pivots: int = 4, text_pivots: int = 4, **kw):
    """DART: every token through K layers, ``tokens`` kept from layer K on (duplication-aware)."""
    spec = f"dart:K={K}" + (f",pivots={pivots}" if pivots != 4 else "") + (f",text_pivots={text_pivots}" if text_pivots != 4 else "")
    return _in_llm("dart", spec, model, tokens, budget, K, **kw)


def pdrop(model, ratio: float | None = None, budget=None, *, layers=None, convention=DEFAULT_CONVENTION,
          visual_tokens=None, text_tokens=64, tokens=None):
    """PyramidDrop with stage boundaries ``layers`` (default: the quarter points of the
    decoder, 8-16-24 for 32 layers as published) and ratio ``ratio`` (lambda), or the
    largest lambda that meets ``budget``. ``tokens`` is not a PDrop parameter: pass
    ``budget`` (e.g. :func:`dop.flops.budget_from_tokens`) instead."""
    if tokens is not None:
        raise ValueError("pdrop keeps a ratio per stage, not a token count: give ratio, or a budget")
    if (ratio is None) == (budget is None):
        raise ValueError("give exactly one of ratio (lambda) or budget (FLOPs fraction)")
    arch = _arch(model)
    n, L = _visual(arch, visual_tokens), arch.decoder.num_layers
    budget, convention, extra = _budget(budget, arch, n, text_tokens, convention)
    layers = parse_layers(layers if layers is not None else default_stage_layers(L))
    spec_of = lambda lam: f"pdrop:layers={'-'.join(map(str, layers))},ratio={lam:.6g}"  # noqa: E731
    if ratio is None:
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"budget: a fraction of the unpruned decoder FLOPs in (0, 1], got {budget}")
        cost = lambda lam: flops_fraction(arch, pdrop_policy(L, layers, lam), n, convention, text_tokens)  # noqa: E731
        lo, hi = 1e-6, 1.0 - 1e-6
        if cost(lo) > budget + 1e-12:
            raise ValueError(
                f"budget {budget:g} is below what PDrop costs at any ratio with stages at layers "
                f"{'-'.join(map(str, layers))} (at least {cost(lo):.4f}, the layers before the first stage "
                "run on every token)" + ("" if layers[0] <= 1 else f"; move the stages earlier (e.g. layers "
                                           f"{'-'.join(str(max(1, l // 4)) for l in layers)})")
            )
        for _ in range(50):  # cost is monotone (step-wise) in lambda
            mid = (lo + hi) / 2
            if cost(mid) <= budget + 1e-12:
                lo = mid
            else:
                hi = mid
        ratio = float(f"{lo:.6g}")
        while cost(ratio) > budget + 1e-12:  # rounding the printed ratio must not overshoot
            ratio = float(f"{ratio - 1e-6:.6g}")
    policy = pdrop_policy(L, layers, ratio)
    extra.update(ratio=ratio, stage_layers=list(layers))
    return _finish(policy, spec_of(ratio), "pdrop", arch, n, text_tokens, extra)


def baseline(method: str, model, **kwargs) -> tuple[Policy, str]:
    """Dispatch by method name (one of :data:`METHODS`)."""
    fns = {"vispruner": vispruner, "cdpruner": cdpruner, "random": random, "spatial": spatial,
           "fastv": fastv, "pdrop": pdrop, "dart": dart}
    if method not in fns:
        raise ValueError(f"unknown baseline {method!r}; known: {', '.join(METHODS)}")
    return fns[method](model, **kwargs)


__all__ = ["METHODS", "baseline", "cdpruner", "dart", "fastv", "flops_fraction", "pdrop", "random",
           "resolve_budget", "spatial", "token_policy", "vispruner"]
