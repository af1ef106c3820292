"""PyramidDrop as a dop policy: stages at ``layers`` keeping ``ratio**s`` of the tokens
(:func:`dop.rankers.pdrop.pdrop_policy`), ``ratio`` given or the largest that meets a budget."""

from __future__ import annotations

from ..rankers.pdrop import default_stage_layers, parse_layers, pdrop_policy
from ..search.cost import DEFAULT_CONVENTION
from .common import arch_of, budget_meta, finish, flops_fraction, register_baseline, visual_count


# published: stages at the quarter points of the decoder; where that costs more than the budget at
# any ratio, the earliest stages (layers 1-2-3)
@register_baseline("pdrop", options=("ratio", "layers"), counts_tokens=False,
                   tries=lambda L: [dict(layers=default_stage_layers(L)), dict(layers=(1, 2, 3))])
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
    arch = arch_of(model)
    n, L = visual_count(arch, visual_tokens), arch.decoder.num_layers
    budget, convention, extra = budget_meta(budget, arch, n, text_tokens, convention)
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
    return finish(policy, spec_of(ratio), "pdrop", arch, n, text_tokens, extra)
