"""What the compared methods share (docs/methods.md): budgets and samples prepared as
:func:`dop.search.search` prepares them, the first-token KL of a policy measured on the
samples (shared among ranks, :mod:`dop.distributed`), the registry of methods
(:data:`METHODS`) and how one budget's result is recorded.

Every method returns a :class:`~dop.search.result.SearchResult`: one
:class:`~dop.search.result.BudgetResult` per budget (its policy, its cost in both
conventions, its in-sample divergence), a ``trace`` of what the method measured on the way,
and the decoder-layer evaluations it spent.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ... import distributed as dd
from ...flops import CONVENTIONS
from ...models import get_adapter
from ...names import loaded_model_name
from ...registry import Registry
from ...policy import Policy
from ...rankers import resolve_for_model
from ...runtime import apply_policy
from ...runtime.replay import batch_last_logits, last_logits
from ..cost import Budget, CostModel, parse_budget
from ..divergence import PreparedSample, kl_divergence, prepare_samples, reference_shape
from ..result import BudgetResult, SearchResult, priced
from ..result import unpruned_note as budget_unpruned_note
from ...batching import collated
from ..verify import sharded_true_divergence


@dataclass(frozen=True)
class Method:
    """A compared method as :data:`METHODS` holds it: its name, the label reports give it,
    its search function (``search(model, processor, samples, budget=None, *, budgets=...,
    ranker=..., convention=..., seed=..., build_prompt=..., progress=..., meta=...,
    batch_size=..., **own options)``, returning a :class:`SearchResult`) and the `dop search`
    options only it takes (argparse names, with the value that means "not given")."""

    name: str
    label: str
    search: Callable[..., SearchResult]
    options: dict = field(default_factory=dict)


# name -> Method; every module of dop.search.methods registers its own (register_method)
METHODS: Registry[Method] = Registry("method", package="dop.search.methods")


def register_method(name: str, label: str, options: dict | None = None):
    """``@register_method("vtw", "VTW")`` above a method's search function."""
    def add(fn):
        METHODS.register(name, Method(name, label, fn, dict(options or {})))
        return fn
    return add


@dataclass
class Setup:
    """Samples, prices and budgets of one method run (as :func:`dop.search.search` makes them)."""

    model: object
    prepared: list[PreparedSample]
    num_layers: int
    costs: dict[str, CostModel]  # by convention
    limits: list[tuple[Budget, str, int]]  # (budget, its convention, its limit)
    info: dict  # provenance recorded in each policy's meta
    shape: dict

    def cost(self, policy: Policy, convention: str) -> int:
        return self.costs[convention].policy_cost(policy)


def setup(model, processor, samples: Sequence, budget=None, budgets: Sequence | None = None, *,
          convention: str = "dop", build_prompt: Callable | None = None, seed: int = 0, method: str = "",
          meta: dict | None = None) -> Setup:
    """Parse the budgets (:func:`dop.search.cost.parse_budget`), prepare the samples
    (:func:`dop.search.divergence.prepare_samples`) and price policies at their reference
    shape in both conventions; every bad input fails here, before any model work."""
    specs = ([] if budget is None else [budget]) + list(budgets or [])
    if not specs:
        raise ValueError("give a budget (e.g. budget=0.14) or budgets=[...]")
    parsed = [parse_budget(b) for b in specs]
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
    samples = list(samples)
    if not samples:
        raise ValueError(f"{method or 'search'}: no samples")
    torch.manual_seed(seed)
    prepared = samples if isinstance(samples[0], PreparedSample) else prepare_samples(model, processor, samples,
                                                                                      build_prompt)
    counts, text = reference_shape(prepared)
    costs = {c: CostModel(model, counts, text, c) for c in CONVENTIONS}
    limits = []
    for b in parsed:
        conv = b.convention(convention)
        limits.append((b, conv, b.limit(costs[conv])))
    info = {"model": loaded_model_name(model) or type(model).__name__, "samples": len(prepared), "seed": seed,
            "method": method, **(meta or {})}
    return Setup(model, prepared, get_adapter(model).num_layers, costs, limits, info,
                 {"visual_tokens": counts, "text_tokens": text})


def resolve_ranker_for(model, ranker):
    """The ranker object (unknown names fail before any work)."""
    return resolve_for_model(ranker, get_adapter(model).num_layers)


class KLMeter:
    """Mean first-token KL of policies on the samples against the unpruned model's logits
    (one prompt per forward: :func:`dop.search.verify.sharded_true_divergence`; with
    ``batch_size`` > 1, that many prompts per forward, padded on the left as the divergence
    table batches them), each rank running its share of the samples (:mod:`dop.distributed`);
    counts the decoder-layer evaluations spent."""

    def __init__(self, model, prepared: Sequence[PreparedSample], ranker, batch_size: int = 1):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model, self.prepared, self.ranker = model, list(prepared), ranker
        self.num_layers = get_adapter(model).num_layers
        self.mine = dd.shard(len(self.prepared))
        with torch.inference_mode():
            self.refs = [last_logits(model, s.inputs) if i in self.mine else None for i, s in enumerate(self.prepared)]
        self.batches = [] if batch_size == 1 else [
            (chunk, collated(model, [self.prepared[i].inputs for i in chunk]))
            for chunk in (self.mine[j:j + batch_size] for j in range(0, len(self.mine), batch_size))]
        self.layer_evals = self.naive_layer_evals = self.num_layers * len(self.prepared)
        self.evaluations = 0

    def __call__(self, policy: Policy) -> float:
        if self.batches:
            per = self._batched_kl(policy)
        else:
            _, per = sharded_true_divergence(self.model, self.prepared, self.refs, policy, self.ranker)
        self.layer_evals += self.num_layers * len(self.prepared)
        self.naive_layer_evals += self.num_layers * len(self.prepared)
        self.evaluations += 1
        return sum(per) / len(per)

    @torch.inference_mode()
    def _batched_kl(self, policy: Policy) -> list[float]:
        local = {}
        with apply_policy(self.model, policy, ranker=self.ranker):
            for chunk, inputs in self.batches:
                q = batch_last_logits(self.model, inputs)
                local.update((i, kl_divergence(self.refs[i], q[row])) for row, i in enumerate(chunk))
        return dd.gather_ordered(local, len(self.prepared))


def progress_bar(total: int, desc: str, progress: bool, unit: str = "policy"):
    return tqdm(total=total, desc=desc, unit=unit, disable=not progress or not dd.is_main(), file=sys.stderr,
                leave=False)


def budget_entry(st: Setup, b: Budget, conv: str, limit: int, policy: Policy, divergence: float, ranker,
                 params: dict, note: str | None = None) -> BudgetResult:
    """One budget's result: ``policy`` with its provenance in ``meta`` (as
    :func:`dop.search.search` records it, plus the method's ``params``) and its FLOPs in both
    conventions. A policy over the limit gets a note saying so."""
    after = st.costs[conv].policy_cost(policy)
    if note is None and after > limit:
        note = (f"{st.info['method']} cannot meet {b.spec}: its cheapest policy costs "
                f"{after / st.costs[conv].unpruned:.4f} of the unpruned decoder ({conv} convention), the budget "
                f"allows {limit / st.costs[conv].unpruned:.4f}")
    meta = {**st.info, "budget": b.spec, "budget_convention": conv, "params": params,
            "true_divergence": divergence}
    return priced(b, conv, limit, policy, st.costs, ranker, meta, note, params=params, divergence=divergence)


def unpruned_note(st: Setup, conv: str, limit: int) -> str | None:
    """The note of a budget at or above the unpruned cost (nothing is pruned), else None."""
    return budget_unpruned_note(st.costs[conv], limit, conv)


def finish(method: str, st: Setup, entries: list[BudgetResult], trace: list[dict], meter, t0: float) -> SearchResult:
    return SearchResult(method, entries, time.perf_counter() - t0, st.shape, meter.layer_evals,
                        meter.naive_layer_evals, meter.evaluations, trace)
