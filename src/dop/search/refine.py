"""Local refinement of a chosen policy by the true joint divergence (docs/design.md, "Search",
"Local refinement").

The additive proxy ignores how operations interact, so the policy it picks need not be the
best one near it. :func:`refine` starts from an assignment of the space (the solver's
choice) and climbs by moves judged by the true first-token KL of the whole policy on a
sample set (:meth:`~dop.search.verify.SampleSet.divergences`):

- *raise*: one parameter up to its next grid value (the table's measured values and the
  unpruned one), where the budget leaves room;
- *swap*: one parameter up to its next grid value and another down to the highest grid value
  that brings the policy back within the limit;
- *lower*: one parameter down to its previous grid value (an op's removal need not raise the
  divergence: on the demo models a shallower attention sometimes lowers it).

Each round lists every such neighbour of the current assignment that is feasible and not yet
measured (policies that mean the same are measured once), orders them by the proxy's
predicted change when a proxy is given (else by their description), and measures them
``batch`` at a time; the best of a batch is taken when it is strictly below the current true
divergence, and the next round starts from it. The climb stops at a local optimum (no
neighbour improves) or after ``max_evals`` policies measured, the start included. The result
is therefore feasible and never worse than the start on these samples; everything is
deterministic (no random draw, ties broken by the description).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from ..policy import Policy
from .divergence import PreparedSample
from .spaces import Param, Space
from .verify import SampleSet

DEFAULT_MAX_EVALS = 32
DEFAULT_BATCH = 8


@dataclass
class RefineTrace:
    """What :func:`refine` measured: every policy (``steps``, in order), the start's and the
    result's true divergence, and the policies measured (``evals``)."""

    start: dict
    start_true: float
    best: dict
    best_true: float
    evals: int = 0  # policies measured on the sample set, the start included
    samples: int = 0
    rounds: int = 0  # rounds that found an improvement
    stopped: str = ""  # "local optimum" or "max_evals"
    wall_s: float = 0.0
    steps: list[dict] = field(default_factory=list)  # {"round", "move", "assign", "cost", "true", "accepted"}

    @property
    def gain(self) -> float:
        """How much lower the result's true divergence is than the start's (>= 0)."""
        return self.start_true - self.best_true

    def to_dict(self) -> dict:
        return {"start": self.start, "start_true": self.start_true, "best": self.best, "best_true": self.best_true,
                "evals": self.evals, "samples": self.samples, "rounds": self.rounds, "stopped": self.stopped,
                "wall_s": self.wall_s, "steps": self.steps}


def refine(model, samples: SampleSet | Sequence[PreparedSample], space: Space,
           cost: Callable[[Policy], int] | object, limit: int, start: Mapping[str, int] | object, ranker, *,
           max_evals: int = DEFAULT_MAX_EVALS, proxy: Mapping[str, Mapping[int, float]] | None = None,
           batch: int = DEFAULT_BATCH) -> tuple[Policy, RefineTrace]:
    """The best policy found by raise, swap and lowering moves from ``start`` (an assignment of
    ``space``, or a :class:`~dop.search.solver.Solution`), judged by the true joint
    first-token KL on ``samples``, and its :class:`RefineTrace`.

    ``cost``: a :class:`~dop.search.cost.CostModel` or a callable pricing a policy; every
    policy measured costs at most ``limit`` under it. ``max_evals``: policies measured at most,
    the start included (>= 1). ``proxy``: the table's proxy (``table.proxy(space)``), used only
    to order the moves of a round. ``batch``: moves measured before the best of them is taken.
    """
    t0 = time.perf_counter()
    if isinstance(max_evals, bool) or not isinstance(max_evals, int) or max_evals < 1:
        raise ValueError(f"max_evals must be a positive integer, got {max_evals!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    price = cost.policy_cost if hasattr(cost, "policy_cost") else cost
    ss = samples if isinstance(samples, SampleSet) else SampleSet.of(model, list(samples))
    cur = _checked_start(space, getattr(start, "assign", start))
    if price(space.policy(cur)) > limit:
        raise ValueError(f"the start policy ({space.describe(cur)}) costs more than the limit {limit}")
    climb = _Climb(model, ss, space, price, ranker)
    (cur_true,) = climb.measure([("start", cur)], 0)
    climb.steps[-1]["accepted"] = True
    trace = RefineTrace(dict(cur), cur_true, dict(cur), cur_true, samples=len(ss.prepared))
    stopped = "local optimum"
    while True:
        moves = climb.new(_moves(space, cur, price, limit, proxy))
        if not moves:
            break
        taken = None
        for first in range(0, len(moves), batch):
            room = max_evals - climb.evals
            if room <= 0:
                break
            chunk = moves[first:first + min(batch, room)]
            trues = climb.measure(chunk, trace.rounds + 1)
            j = min(range(len(chunk)), key=lambda i: trues[i])
            if trues[j] < cur_true:
                taken = (chunk[j][1], trues[j], len(climb.steps) - len(chunk) + j)
                break
        if taken is None:
            if climb.evals >= max_evals:
                stopped = "max_evals"
            break
        cur, cur_true, at = taken
        climb.steps[at]["accepted"] = True
        trace.rounds += 1
    trace.best, trace.best_true = dict(cur), cur_true
    trace.evals, trace.steps, trace.stopped = climb.evals, climb.steps, stopped
    trace.wall_s = time.perf_counter() - t0
    return space.policy(cur), trace


def _checked_start(space: Space, start) -> dict[str, int]:
    """``start`` as a full assignment of ``space`` (every parameter, values it may take)."""
    if not isinstance(start, Mapping):
        raise TypeError(f"start must be an assignment of the space or a Solution, got {type(start).__name__}")
    names = [p.name for p in space.params]
    missing, extra = [n for n in names if n not in start], [n for n in start if n not in names]
    if missing or extra:
        raise ValueError(f"start assignment does not match space {space.name!r}: missing {missing}, unknown {extra}")
    out = {}
    for p in space.params:
        v = start[p.name]
        if isinstance(v, bool) or not isinstance(v, int) or v not in p.values:
            raise ValueError(f"start assignment: {p.name}={v!r} is not a value of the space "
                             f"({min(p.values)}..{max(p.values)})")
        out[p.name] = v
    return out


class _Climb:
    """The measuring side of one :func:`refine`: true divergences of the policies asked for,
    each distinct policy once, and the steps recorded."""

    def __init__(self, model, ss: SampleSet, space: Space, price, ranker):
        self.model, self.ss, self.space, self.price, self.ranker = model, ss, space, price, ranker
        self.known: dict[Policy, float] = {}
        self.steps: list[dict] = []
        self.evals = 0

    def new(self, moves: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
        """The moves to a policy not measured yet, the first of those that mean the same."""
        out, fresh = [], set()
        for m in moves:
            p = self.space.policy(m[1])
            if p not in self.known and p not in fresh:
                fresh.add(p)
                out.append(m)
        return out

    def measure(self, moves: list[tuple[str, dict]], rnd: int) -> list[float]:
        policies = [self.space.policy(a) for _, a in moves]
        trues = self.ss.divergences(self.model, [(p, self.ranker) for p in policies])
        for (what, a), p, t in zip(moves, policies, trues):
            self.known[p] = t
            self.steps.append({"round": rnd, "move": what, "assign": dict(a), "cost": int(self.price(p)),
                               "true": t, "accepted": False})
        self.evals += len(moves)
        return trues


def _grid(p: Param) -> list[int]:
    """The values a move steps between: the table's measured values and the unpruned one."""
    return sorted(set(p.measured) | {p.unpruned})


def _moves(space: Space, cur: dict, price, limit: int, proxy) -> list[tuple[str, dict]]:
    """Every feasible raise, swap and lowering of ``cur`` (see the module's docstring), ordered by the
    proxy's predicted change (when given), then by description."""
    out = []
    for p in space.params:  # lowering alone is always feasible; it may help where an op's effect is not monotone
        below = [v for v in _grid(p) if v < cur[p.name]]
        if below:
            out.append((f"{p.name} {cur[p.name]}->{below[-1]}", dict(cur, **{p.name: below[-1]})))
    for up in space.params:
        above = [v for v in _grid(up) if v > cur[up.name]]
        if not above:
            continue
        raised = dict(cur, **{up.name: above[0]})
        if price(space.policy(raised)) <= limit:
            out.append((f"{up.name} {cur[up.name]}->{above[0]}", raised))
            continue  # a swap would only lower something for nothing
        for down in space.params:
            if down is up:
                continue
            for v in reversed([v for v in _grid(down) if v < cur[down.name]]):
                cand = dict(raised, **{down.name: v})
                if price(space.policy(cand)) <= limit:
                    out.append((f"{up.name} {cur[up.name]}->{above[0]}, {down.name} {cur[down.name]}->{v}", cand))
                    break

    def predicted(move):
        if proxy is None:
            return 0.0
        return sum(proxy[n][move[1][n]] - proxy[n][cur[n]] for n in cur if move[1][n] != cur[n])

    return sorted(out, key=lambda m: (predicted(m), m[0]))
