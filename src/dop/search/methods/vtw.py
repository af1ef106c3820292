"""VTW, visual tokens withdrawal (docs/methods.md, "VTW"): every visual token takes part in
every operation of layers ``0..K-1`` and in none from layer ``K`` on. ``K`` is chosen by
the first-token KL on the samples among the withdrawal layers whose cost fits the budget.

    from dop.search.methods import vtw
    result = vtw.search(model, processor, samples, budgets=["tokens:16", "tokens:32"])
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

from ...policy import Policy
from . import common

NAME = "vtw"


def withdrawal_policy(num_layers: int, k: int) -> Policy:
    """Visual tokens withdrawn from layer ``k`` on (every op kind); ``k == num_layers`` is the unpruned model."""
    if not 0 <= k <= num_layers:
        raise ValueError(f"withdrawal layer must lie in [0, {num_layers}], got {k}")
    return Policy.unpruned(num_layers) if k == num_layers else Policy.token_pruning(num_layers, 0.0, k)


def deepest_fitting(st: common.Setup, conv: str, limit: int) -> int | None:
    """The largest ``K`` whose withdrawal policy costs at most ``limit`` (cost grows with K), or None."""
    fits = [k for k in range(st.num_layers + 1) if st.cost(withdrawal_policy(st.num_layers, k), conv) <= limit]
    return max(fits) if fits else None


def choose(kl: dict[int, float], k_max: int, threshold: float | None = None) -> int:
    """The rule (docs/methods.md, "VTW"): among ``K <= k_max``, the one of least KL (the
    smaller K on a tie); with ``threshold``, the paper's own rule instead: the smallest K
    whose KL is at most ``threshold`` (the least-KL one when none is)."""
    ks = [k for k in sorted(kl) if k <= k_max]
    if threshold is not None:
        under = [k for k in ks if kl[k] <= threshold]
        if under:
            return under[0]
    return min(ks, key=lambda k: (kl[k], k))


@common.register_method(NAME, "VTW")
def search(model, processor, samples: Sequence, budget=None, *, budgets: Sequence | None = None,
           convention: str = "dop", threshold: float | None = None, seed: int = 0,
           build_prompt: Callable | None = None, progress: bool = True, meta: dict | None = None, batch_size: int = 1,
           ranker=None) -> common.SearchResult:
    """VTW's withdrawal layer under each budget (``budget``/``budgets`` as in
    :func:`dop.search.search`). ``threshold``: the paper's rule (the smallest fitting K whose
    KL is at most it) instead of the least-KL fitting K. ``ranker`` is accepted for a common
    call shape and ignored: VTW withdraws every visual token, whatever their order."""
    t0 = time.perf_counter()
    st = common.setup(model, processor, samples, budget, budgets, convention=convention, build_prompt=build_prompt,
                      seed=seed, method=NAME, meta=meta)
    L = st.num_layers
    k_max = {i: deepest_fitting(st, conv, lim) for i, (_, conv, lim) in enumerate(st.limits)}
    deepest = max((k for k in k_max.values() if k is not None), default=0)
    meter = common.KLMeter(model, st.prepared, "identity", batch_size)
    kl = {L: 0.0}
    bar = common.progress_bar(min(deepest, L - 1) + 1, "vtw", progress)
    for k in range(min(deepest, L - 1) + 1):  # K = L is the unpruned model (KL 0)
        kl[k] = meter(withdrawal_policy(L, k))
        bar.update(1)
    bar.close()
    trace = [{"K": k, "divergence": kl[k], "cost": {c: st.cost(withdrawal_policy(L, k), c) for c in st.costs}}
             for k in sorted(kl)]
    entries = []
    for i, (b, conv, lim) in enumerate(st.limits):
        k = 0 if k_max[i] is None else choose(kl, k_max[i], threshold)
        note = common.unpruned_note(st, conv, lim) if k == L else None
        entries.append(common.budget_entry(st, b, conv, lim, withdrawal_policy(L, k), kl[k], None,
                                           {"K": k, "threshold": threshold}, note))
    return common.finish(NAME, st, entries, trace, meter, t0)
