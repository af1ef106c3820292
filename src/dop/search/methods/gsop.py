"""GSOP, greedily sorted operation pruning (docs/methods.md, "GSOP").

An *operation* here is one op kind of one rank group of visual tokens in one block of
consecutive layers. Starting from the unpruned model, each step removes the operation whose
removal costs least divergence per FLOP saved, given everything removed so far: the
divergence of each candidate is the *joint* first-token KL of the policy with it removed
(``metric="kl"``), or the loss of task accuracy on the samples' answers
(``metric="accuracy"``). One greedy path serves every budget: each budget gets the first
policy of the path that meets it.

    from dop.search.methods import gsop
    result = gsop.search(model, processor, samples, budgets=["tokens:16", "tokens:32"], ranker="vispruner")
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

from ...evaluate import evaluate
from ...policy import Policy, PolicyError
from . import common

NAME = "gsop"
DEFAULT_GROUPS = (0.25, 0.5, 1.0)
DEFAULT_KINDS = ("attn", "mlp")
DEFAULT_BLOCKS = 4  # layer blocks when block is not given: ceil(L / 4) layers each (2 on the 8-layer demo)
METRICS = ("kl", "accuracy")


@dataclass(frozen=True)
class Op:
    block: int
    group: int
    kind: str

    def to_dict(self, block: int, num_layers: int) -> dict:
        return {"block": self.block, "layers": list(block_layers(self.block, block, num_layers)),
                "group": self.group, "kind": self.kind}


def block_layers(b: int, block: int, num_layers: int) -> range:
    return range(b * block, min((b + 1) * block, num_layers))


class OpSpace:
    """The candidate operations and the policy of a set of removed ones."""

    def __init__(self, num_layers: int, groups: Sequence[float], kinds: Sequence[str], block: int):
        if not isinstance(block, int) or isinstance(block, bool) or not 1 <= block <= num_layers:
            raise ValueError(f"block must be an integer in [1, {num_layers}] (layers per operation), got {block!r}")
        kinds = tuple(kinds)
        bad = [k for k in kinds if k not in ("attn", "attn_q", "attn_kv", "mlp")]
        if bad or not kinds or len(set(kinds)) != len(kinds):
            raise ValueError(f"kinds must be distinct op kinds of attn, attn_q, attn_kv, mlp; got {list(kinds)}")
        if "attn" in kinds and ({"attn_q", "attn_kv"} & set(kinds)):
            raise ValueError("kinds: 'attn' may not be combined with 'attn_q' or 'attn_kv'")
        try:
            Policy(num_layers, list(groups))
        except PolicyError as e:
            raise ValueError(f"groups: {e}") from None
        self.num_layers, self.groups, self.kinds, self.block = num_layers, tuple(groups), kinds, block
        n_blocks = -(-num_layers // block)
        self.ops = [Op(b, g, k) for b in range(n_blocks) for g in range(len(self.groups)) for k in kinds]

    def policy(self, removed) -> Policy:
        skip: dict[str, list[set]] = {}
        for op in removed:
            per = skip.setdefault(op.kind, [set() for _ in self.groups])
            per[op.group].update(block_layers(op.block, self.block, self.num_layers))
        if not skip:
            return Policy.unpruned(self.num_layers, list(self.groups))
        return Policy(self.num_layers, list(self.groups), {}, skip={k: [sorted(s) for s in v] for k, v in skip.items()})


class AccuracyMeter:
    """One minus the mean task accuracy (:func:`dop.evaluate.evaluate`, greedy answers) of a
    policy on the samples: a loss, lower is better, as the KL is."""

    def __init__(self, model, processor, samples, ranker, build_prompt, num_layers: int, max_new_tokens: int = 10):
        self.args = (model, processor, samples)
        self.ranker, self.build_prompt, self.max_new_tokens = ranker, build_prompt, max_new_tokens
        self.layer_evals = self.naive_layer_evals = 0
        self.per_eval = num_layers * len(samples)  # prefill layers; the generated tokens' are not counted
        self.evaluations = 0
        self.unpruned = self(None)

    def __call__(self, policy: Policy | None) -> float:
        res = evaluate(*self.args, policy=policy, ranker=self.ranker if policy is not None else None,
                       max_new_tokens=self.max_new_tokens, progress=False, build_prompt=self.build_prompt,
                       run_baseline=False, time_prefill=False)
        self.layer_evals += self.per_eval
        self.naive_layer_evals += self.per_eval
        self.evaluations += policy is not None
        return 1.0 - res.average


def greedy_path(space: OpSpace, loss, cost: Callable[[Policy], int], done: Callable[[Policy], bool],
                start_loss: float, bar=None) -> list[dict]:
    """The greedy order (docs/methods.md, "GSOP"): until ``done(policy)``, remove the op of
    least ``(loss(with it removed) - loss(now)) / (cost(now) - cost(with it removed))``
    (ties: the larger saving, then the earlier op). Each step: the op, its loss, cost,
    criterion and how many candidates were measured."""
    removed: list[Op] = []
    cur_loss, cur_cost = start_loss, cost(space.policy(removed))
    steps = []
    while not done(space.policy(removed)) and len(removed) < len(space.ops):
        best = None
        tried = 0
        for i, op in enumerate(space.ops):
            if op in removed:
                continue
            pol = space.policy(removed + [op])
            saving = cur_cost - cost(pol)
            if saving <= 0:
                continue  # removing it saves nothing (e.g. a block past the last layer)
            tried += 1
            value = loss(pol)
            key = ((value - cur_loss) / saving, -saving, i)
            if best is None or key < best[0]:
                best = (key, op, value, cur_cost - saving)
        if best is None:
            break
        (crit, _, _), op, cur_loss, cur_cost = best
        removed.append(op)
        steps.append({"step": len(steps), "op": op, "loss": cur_loss, "cost": cur_cost, "criterion": crit,
                      "candidates": tried})
        if bar is not None:
            bar.update(1)
    return steps


@common.register_method(NAME, "GSOP", options={"metric": "kl"})
def search(model, processor, samples: Sequence, budget=None, *, budgets: Sequence | None = None,
           ranker="vispruner", groups: Sequence[float] = DEFAULT_GROUPS, kinds: Sequence[str] = DEFAULT_KINDS,
           block: int | None = None, metric: str = "kl", convention: str = "dop", seed: int = 0,
           build_prompt: Callable | None = None, progress: bool = True, meta: dict | None = None, batch_size: int = 1,
           max_new_tokens: int = 10) -> common.SearchResult:
    """GSOP's greedy path and its policy at each budget (``budget``/``budgets`` as in
    :func:`dop.search.search`). Operations: ``kinds`` x rank ``groups`` (cumulative
    fractions, ranked by ``ranker``) x blocks of ``block`` layers (default: the depth in
    four blocks, so the number of operations, and the cost, do not grow with it). ``metric``: ``"kl"``
    (joint first-token KL) or ``"accuracy"`` (task accuracy of greedy answers of at most
    ``max_new_tokens`` tokens; needs samples with answers, not prepared ones)."""
    t0 = time.perf_counter()
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    st = common.setup(model, processor, samples, budget, budgets, convention=convention, build_prompt=build_prompt,
                      seed=seed, method=NAME, meta=meta)
    rk = common.resolve_ranker_for(model, ranker)
    block = -(-st.num_layers // DEFAULT_BLOCKS) if block is None else block
    space = OpSpace(st.num_layers, groups, kinds, block)
    kl = common.KLMeter(model, st.prepared, rk, batch_size)
    meter = kl
    if metric == "accuracy":
        if isinstance(list(samples)[0], common.PreparedSample):
            raise ValueError("metric='accuracy' needs the samples with their answers, not prepared samples")
        meter = AccuracyMeter(model, processor, list(samples), rk, build_prompt, st.num_layers, max_new_tokens)
    convs = {c for _, c, _ in st.limits}
    conv = convs.pop() if len(convs) == 1 else "dop"  # savings counted in the budgets' convention

    def done(policy):
        return all(st.cost(policy, c) <= lim for _, c, lim in st.limits)

    bar = common.progress_bar(len(space.ops), "gsop", progress, unit="step")  # a greedy step measures every candidate
    start = 0.0 if metric == "kl" else meter.unpruned
    steps = greedy_path(space, meter, lambda p: st.cost(p, conv), done, start, bar)
    bar.close()
    path = [space.policy([s["op"] for s in steps[:j]]) for j in range(len(steps) + 1)]
    losses = [start] + [s["loss"] for s in steps]
    entries = []
    for b, c, lim in st.limits:
        j = next((j for j, p in enumerate(path) if st.cost(p, c) <= lim), len(path) - 1)
        div = losses[j] if metric == "kl" else (kl(path[j]) if j else 0.0)
        entries.append(common.budget_entry(st, b, c, lim, path[j], div, ranker,
                                           {"steps": j, "metric": metric, "loss": losses[j]},
                                           common.unpruned_note(st, c, lim) if j == 0 else None))
    trace = [{**s, "op": s["op"].to_dict(block, st.num_layers)} for s in steps]
    res = common.finish(NAME, st, entries, trace, meter, t0)
    if meter is not kl:  # the KL of the chosen policies, measured besides
        res.evaluations += kl.evaluations
        res.layer_evals += kl.layer_evals
        res.naive_layer_evals += kl.naive_layer_evals
    return res
