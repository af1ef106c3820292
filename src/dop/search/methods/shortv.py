"""ShortV, visual tokens frozen in ineffective layers (docs/methods.md, "ShortV").

In a frozen layer no visual token receives the attention update (``attn_q`` skipped) or the
MLP update (``mlp`` skipped); their keys and values stay (``attn_kv`` kept), so the text
still attends to them. A layer's *contribution* is the first-token KL of freezing the visual
tokens in that layer alone; the layers of least contribution are frozen, as few as the budget
needs.

    from dop.search.methods import shortv
    result = shortv.search(model, processor, samples, budgets=["tokens:16", "tokens:32"])
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

from ...policy import Policy
from . import common

NAME = "shortv"
FROZEN_KINDS = ("attn_q", "mlp")  # attn_kv is never skipped


def frozen_policy(num_layers: int, layers) -> Policy:
    """Visual tokens frozen (``attn_q`` and ``mlp`` skipped, keys/values kept) in ``layers``."""
    layers = sorted(set(int(l) for l in layers))
    if not layers:
        return Policy.unpruned(num_layers)
    return Policy(num_layers, [1.0], {}, skip={k: [layers] for k in FROZEN_KINDS})


def layer_order(contribution: dict[int, float]) -> list[int]:
    """Layers by increasing contribution (the lower layer first on a tie)."""
    return sorted(contribution, key=lambda l: (contribution[l], l))


def fewest_frozen(st: common.Setup, order: list[int], conv: str, limit: int) -> int:
    """The fewest leading layers of ``order`` whose freezing costs at most ``limit`` (all of
    them when even that does not fit: the caller notes the miss)."""
    for k in range(len(order) + 1):
        if st.cost(frozen_policy(st.num_layers, order[:k]), conv) <= limit:
            return k
    return len(order)


@common.register_method(NAME, "ShortV")
def search(model, processor, samples: Sequence, budget=None, *, budgets: Sequence | None = None,
           convention: str = "dop", seed: int = 0, build_prompt: Callable | None = None, progress: bool = True,
           meta: dict | None = None, batch_size: int = 1, ranker=None) -> common.SearchResult:
    """ShortV's frozen layers under each budget (``budget``/``budgets`` as in
    :func:`dop.search.search`). ``ranker`` is accepted for a common call shape and ignored:
    ShortV freezes every visual token of a layer, whatever their order."""
    t0 = time.perf_counter()
    st = common.setup(model, processor, samples, budget, budgets, convention=convention, build_prompt=build_prompt,
                      seed=seed, method=NAME, meta=meta)
    L = st.num_layers
    meter = common.KLMeter(model, st.prepared, "identity", batch_size)
    bar = common.progress_bar(L + len(st.limits), "shortv", progress)
    contribution = {}
    for l in range(L):
        contribution[l] = meter(frozen_policy(L, [l]))
        bar.update(1)
    order = layer_order(contribution)
    trace = [{"layer": l, "contribution": contribution[l]} for l in range(L)]
    measured: dict[int, float] = {0: 0.0}
    entries = []
    for b, conv, lim in st.limits:
        k = fewest_frozen(st, order, conv, lim)
        if k not in measured:
            measured[k] = meter(frozen_policy(L, order[:k]))
        bar.update(1)
        note = common.unpruned_note(st, conv, lim) if k == 0 else None
        entries.append(common.budget_entry(st, b, conv, lim, frozen_policy(L, order[:k]), measured[k], None,
                                           {"frozen_layers": sorted(order[:k]), "K": k}, note))
    bar.close()
    return common.finish(NAME, st, entries, trace, meter, t0)
