"""Check the additive proxy against the truth (``--verify K``, docs/design.md, "Search").

- the true joint divergence (full pruned forwards) of the chosen policy;
- the proxy and true divergence of K random feasible policies of the space (drawn by
  :func:`~dop.search.spaces.draw_feasible`, ``ordered`` by default), and the Spearman rank
  correlation between them;
- token pruning at the same budget with the same ranker (the most visual tokens kept at
  layer 0 whose cost fits), and its true divergence;
- the true divergence of the blind policy (no visual operation at any layer) and how many of
  the random policies are at least that far from the unpruned model. Such policies have lost
  what the image tells; their divergences bunch up near the blind one, so their order says
  little and a low Spearman over a sample made mostly of them is expected.

The same policies (:class:`Candidates`, drawn once) are measured on each sample set: the
samples the search ran on (in-sample) and, when given, samples it did not use (held-out),
so that the two columns differ only by the samples (docs/design.md, "Held-out verification").
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .. import distributed as dd
from ..models import get_adapter
from ..policy import Policy
from ..rankers import resolve_ranker
from ..rankers.base import rerank_layers
from ..runtime import apply_policy
from ..runtime.replay import capture_prefix, last_logits
from .candidates import candidate_depths, replay_candidates
from .cost import largest_fitting
from .divergence import PreparedSample, kl_divergence, true_divergence
from .robust import DEFAULT_AGGREGATE, aggregate, outliers
from .spaces.solver import Solution, Solver
from .spaces import DEFAULT_DRAW, draw_feasible
from .table import VALUE_BATCH


@dataclass
class Verification:
    """The true divergences of one verification on one sample set."""

    chosen_true: float
    chosen_proxy: float
    random: list[dict] = field(default_factory=list)  # {"assign", "proxy", "true", "cost"}
    spearman: float | None = None
    spearman_p: float | None = None
    token_pruning: dict | None = None  # {"n_keep", "policy", "cost", "true"}
    blind_true: float | None = None  # true divergence with every visual op pruned (from the space's min depth)
    num_samples: int | None = None  # the samples the true divergences are means over
    draw: str | None = None  # how the random policies were drawn (:func:`~dop.search.spaces.draw_feasible`)
    aggregate: str = DEFAULT_AGGREGATE  # how each policy's per-sample divergences became one figure
    chosen_per_sample: list[float] = field(default_factory=list)  # the chosen policy's, in sample order
    sample_ids: list[str] = field(default_factory=list)

    @property
    def outliers(self) -> list[dict]:
        """Samples on which the chosen policy's divergence exceeds 10x its median (robust.outliers)."""
        return outliers(self.chosen_per_sample, self.sample_ids) if self.chosen_per_sample else []

    def closer_than_blind(self) -> list[dict]:
        """The random policies whose true divergence is below the blind policy's."""
        if self.blind_true is None:
            return []
        return [r for r in self.random if r["true"] < self.blind_true * (1 - 1e-6)]

    @property
    def spearman_below_blind(self) -> float | None:
        """Spearman proxy vs truth over the random policies closer than the blind one."""
        return None if self.blind_true is None else spearman(self.closer_than_blind())[0]

    @property
    def n_at_least_blind(self) -> int | None:
        """Random policies whose true divergence is at least the blind policy's."""
        return None if self.blind_true is None else len(self.random) - len(self.closer_than_blind())

    def to_dict(self) -> dict:
        return {
            "samples": self.num_samples, "draw": self.draw, "chosen_true": self.chosen_true,
            "chosen_proxy": self.chosen_proxy, "spearman": self.spearman, "spearman_p": self.spearman_p,
            "random": self.random, "token_pruning": self.token_pruning,
            "blind_true": self.blind_true, "n_at_least_blind": self.n_at_least_blind,
            "spearman_below_blind": self.spearman_below_blind, "aggregate": self.aggregate,
            "chosen_per_sample": self.chosen_per_sample, "sample_ids": self.sample_ids, "outliers": self.outliers,
        }


@dataclass
class SampleSet:
    """Samples to measure true divergences on, with the unpruned model's last-position
    logits of this rank's share (None elsewhere; :func:`reference_logits`)."""

    prepared: Sequence[PreparedSample]
    refs: list

    @classmethod
    def of(cls, model, prepared: Sequence[PreparedSample]) -> "SampleSet":
        return cls(prepared, reference_logits(model, prepared))

    def divergences(self, model, policies: Sequence[tuple[Policy, object]], how: str = DEFAULT_AGGREGATE) -> list[float]:
        """The true first-token KL of each ``(policy, ranker)`` on these samples, aggregated
        by ``how`` (the mean by default; :mod:`dop.search.robust`), the samples shared among
        the ranks (:func:`sharded_true_divergence`)."""
        return [aggregate(per, how) for per in self.per_sample(model, policies)]

    def per_sample(self, model, policies: Sequence[tuple[Policy, object]]) -> list[list[float]]:
        """Per ``(policy, ranker)``, the true first-token KL of every sample, in sample order
        (one full pruned forward per policy and sample)."""
        return [sharded_true_divergence(model, self.prepared, self.refs, p, r)[1] for p, r in policies]

    def measured(self, model, policies: Sequence[tuple[Policy, object]],
                 value_batch: int = VALUE_BATCH) -> tuple[list[list[float]], int]:
        """:meth:`per_sample` batched, and the decoder-layer calls it took per sample.
        Policies of one ranker that re-ranks nowhere inside the LLM and skip no single layer
        run together: per sample the unpruned forward is cached once and ``value_batch`` of
        them are the rows of one forward (the divergence table's batched replay from layer 0,
        :mod:`dop.search.candidates`: equal to their full forwards in float64, to float32
        rounding otherwise); the others one full forward each."""
        L = get_adapter(model).num_layers
        out: list = [None] * len(policies)
        batched: dict[str, list[int]] = {}
        calls = 0
        for i, (p, r) in enumerate(policies):
            if p.skip or p.is_unpruned() or rerank_layers(resolve_ranker(r)):
                out[i] = self.per_sample(model, [(p, r)])[0]
                calls += L
            else:
                batched.setdefault(repr(r), []).append(i)
        for idx in batched.values():
            ranker = policies[idx[0]][1]
            mine = dd.shard(len(self.prepared))
            per = {j: _replayed(model, self.prepared[j].inputs, self.refs[j], [policies[i][0] for i in idx],
                                ranker, value_batch) for j in mine}
            rows = dd.gather_ordered(per, len(self.prepared))
            for col, i in enumerate(idx):
                out[i] = [row[col] for row in rows]
            calls += L * (1 + -(-len(idx) // value_batch))
        return out, calls

    @property
    def ids(self) -> list[str]:
        """What each sample is (``PreparedSample.where``, else its index)."""
        return [s.where or f"#{i}" for i, s in enumerate(self.prepared)]


@torch.inference_mode()
def _replayed(model, inputs: dict, ref, policies: Sequence[Policy], ranker, value_batch: int) -> list[float]:
    """The first-token KL of each policy on one prompt, ``value_batch`` policies per batched
    replay of every decoder layer from the cached unpruned run."""
    prefix = capture_prefix(model, inputs)
    out = []
    for first in range(0, len(policies), value_batch):
        chunk = policies[first:first + value_batch]
        states = [candidate_depths(model, prefix, p, ranker, {}, 0) for p in chunk]
        with apply_policy(model, chunk[0], ranker=ranker) as handle:
            q = replay_candidates(handle, prefix, states, 0)
        out += [kl_divergence(ref, row[0]) for row in q]
    return out


def reference_logits(model, prepared: Sequence[PreparedSample]) -> list:
    """The unpruned last-position logits of this rank's samples (:func:`dd.shard`), None for
    the other ranks' (:func:`sharded_true_divergence` runs this rank's samples only)."""
    mine = set(dd.shard(len(prepared)))
    with torch.inference_mode():
        return [last_logits(model, s.inputs) if i in mine else None for i, s in enumerate(prepared)]


@dataclass
class Candidates:
    """The policies one verification measures: the chosen one, ``k`` random feasible ones
    (with their proxy and cost), token pruning at the same budget and the blind policy."""

    chosen: Policy
    chosen_proxy: float
    random: list[dict]  # {"assign", "proxy", "cost"}
    policies: list[Policy]  # of the random assignments, in order
    token_pruning: dict | None  # {"n_keep", "policy", "cost"}
    token_policy: Policy | None
    blind: Policy
    draw_kind: str = DEFAULT_DRAW  # how the random policies were drawn (:data:`~dop.search.spaces.DRAWS`)

    @classmethod
    def draw(cls, space, solver: Solver, solution: Solution, k: int, seed: int = 0,
             draw: str = DEFAULT_DRAW) -> "Candidates":
        """The candidates of one verification; ``draw`` as in :func:`~dop.search.spaces.draw_feasible`
        (docs/design.md, "Held-out verification", says why ``ordered`` is the default)."""
        cost = solver.cost
        assigns = draw_feasible(space, cost.policy_cost, solution.limit, k, seed, draw)
        policies = [space.policy(a) for a in assigns]
        rows = [{"assign": a, "proxy": solver.proxy_of(a), "cost": cost.policy_cost(p)}
                for a, p in zip(assigns, policies)]
        tp, tp_policy = None, None
        found = token_pruning_at(cost, space.num_layers, space.n_ref, solution.limit, space.min_depth)
        if found is not None:
            n, tp_policy = found
            tp = {"n_keep": n, "policy": tp_policy.to_dict(), "cost": cost.policy_cost(tp_policy)}
        blind = Policy.token_pruning(space.num_layers, 0.0, space.min_depth)
        return cls(solution.policy, solution.predicted, rows, policies, tp, tp_policy, blind, draw)


def token_pruning_at(cost, num_layers: int, n_ref: int, limit: int, depth: int = 0) -> tuple[int, Policy] | None:
    """The most tokens kept (the rest pruned from every op from layer ``depth`` on) whose cost
    fits ``limit``."""
    def pol(n):
        return Policy.token_pruning(num_layers, n / n_ref, depth)

    n = largest_fitting(lambda n: cost.policy_cost(pol(n)) <= limit, n_ref)
    return None if n is None else (n, pol(n))


def sharded_true_divergence(model, prepared: Sequence[PreparedSample], refs, policy, ranker) -> tuple[float, list[float]]:
    """:func:`true_divergence` with the samples shared among the ranks (:mod:`dop.distributed`):
    each rank runs its share (``refs`` may hold None elsewhere), the per-sample values are
    gathered in sample order, so the mean is one process's."""

    mine = dd.shard(len(prepared))
    per = []
    if mine:
        _, per = true_divergence(model, [prepared[i] for i in mine], [refs[i] for i in mine], policy, ranker)
    per = dd.gather_ordered(dict(zip(mine, per)), len(prepared))
    return sum(per) / len(per), per


def measure(model, samples: SampleSet, cand: Candidates, ranker, progress: bool = True,
            desc: str = "verify", how: str = DEFAULT_AGGREGATE) -> Verification:
    """The true divergence of every candidate on ``samples`` (the ranks go policy by policy
    together, each on its share of the samples), each aggregated over the samples by ``how``."""

    policies = [cand.chosen, *cand.policies, cand.token_policy, cand.blind]
    bar = tqdm(total=len(policies), desc=desc, unit="policy", disable=not progress or not dd.is_main(),
               file=sys.stderr, leave=False)
    per = []
    for pol in policies:
        per.append(None if pol is None else sharded_true_divergence(model, samples.prepared, samples.refs,
                                                                      pol, ranker)[1])
        bar.update(1)
    bar.close()
    truths = [None if p is None else aggregate(p, how) for p in per]
    chosen, *rand, tp_true, blind = truths
    rows = [dict(r, true=t) for r, t in zip(cand.random, rand)]
    rho, pval = spearman(rows)
    tp = None if cand.token_pruning is None else dict(cand.token_pruning, true=tp_true)
    return Verification(chosen, cand.chosen_proxy, rows, rho, pval, tp, blind, len(samples.prepared), cand.draw_kind,
                        how, per[0], samples.ids)


def verify(model, prepared: Sequence[PreparedSample], refs, space, solver: Solver, solution: Solution,
           k: int, ranker, seed: int = 0, progress: bool = True, draw: str = DEFAULT_DRAW) -> Verification:
    """:func:`measure` of freshly drawn :class:`Candidates` on one sample set."""
    cand = Candidates.draw(space, solver, solution, k, seed, draw)
    return measure(model, SampleSet(prepared, refs), cand, ranker, progress)


def spearman(rows: list[dict]) -> tuple[float | None, float | None]:
    """Spearman rank correlation of proxy and truth (None for fewer than 3 rows or constant values)."""
    from scipy.stats import spearmanr  # heavy: scipy, only when a verification reports

    if len(rows) < 3:
        return None, None
    r = spearmanr([x["proxy"] for x in rows], [x["true"] for x in rows])
    if r.statistic != r.statistic:  # NaN: constant inputs
        return None, None
    return float(r.statistic), float(r.pvalue)
