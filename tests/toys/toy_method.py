"""A toy compared method in one file: the deepest withdrawal layer whose cost fits each
budget (VTW's policies without its KL rule), its KL measured once per budget."""

from __future__ import annotations

import time

from dop.search.methods import common
from dop.search.methods.vtw import deepest_fitting, withdrawal_policy


@common.register_method("toy_method", "Toy")
def search(model, processor, samples, budget=None, *, budgets=None, convention="dop", seed=0, build_prompt=None,
           progress=True, meta=None, batch_size=1, ranker=None):
    t0 = time.perf_counter()
    st = common.setup(model, processor, samples, budget, budgets, convention=convention, build_prompt=build_prompt,
                      seed=seed, method="toy_method", meta=meta)
    meter = common.KLMeter(model, st.prepared, "identity", batch_size)
    entries = []
    for b, conv, lim in st.limits:
        k = deepest_fitting(st, conv, lim) or 0
        policy = withdrawal_policy(st.num_layers, k)
        entries.append(common.budget_entry(st, b, conv, lim, policy, meter(policy), None, {"K": k}))
    return common.finish("toy_method", st, entries, [], meter, t0)
