"""The rows of results.json (typed): one :class:`ResultRow` per evaluated method (and the
unpruned model), with its accuracy, cost, prefill time and policy, and the comparison of
DOP's best row with the best baseline at a budget."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..policy import Policy
from .timing import spread

FORMAT = "dop-results/1"  # results.json of one model (several: "dop-run-models/1")


@dataclass
class ResultRow:
    """One evaluation on the test split, as results.json and the report show it."""

    method: str  # "unpruned", "DOP (dop)", "GSOP", a baseline's name
    kind: str  # "unpruned", "dop", "method" or "baseline"
    policy_file: str | None
    tasks: dict[str, float]  # accuracy per task
    average: float
    rel_avg: float | None
    flops_dop: float | None  # decoder FLOPs (dop convention)
    flops_paper: float | None  # decoder MACs (paper convention)
    flops_fraction: float | None  # of the unpruned decoder's, dop convention
    prefill_ms: float | None
    prefill_cv: float | None  # spread of the per-sample prefill times (std / mean)
    policy: dict | None
    summary: str
    ci: Any = None  # bootstrap intervals (dop.evaluate.bootstrap)

    @classmethod
    def of(cls, label: str, kind: str, d: dict, unpruned_d: dict, policy_file: str | None, policy: Policy | None,
           n_visual: int, ci=None) -> "ResultRow":
        """The row of the evaluation ``d`` (``EvalResult.to_dict``), its FLOPs against the
        unpruned evaluation's."""
        flops = d.get("flops") or {}
        base = (unpruned_d.get("flops") or {}).get("dop", {}).get("decoder")
        dec = flops.get("dop", {}).get("decoder")
        return cls(
            method=label,
            kind=kind,
            policy_file=policy_file,
            tasks={t: s["accuracy"] for t, s in d["tasks"].items()},
            average=d["average"],
            rel_avg=1.0 if kind == "unpruned" else d.get("rel_avg"),
            flops_dop=dec,
            flops_paper=flops.get("paper", {}).get("decoder"),
            flops_fraction=(dec / base) if (dec is not None and base) else None,
            prefill_ms=d.get("prefill_ms"),
            prefill_cv=spread([s.get("prefill_ms") for s in d.get("samples", [])]),
            policy=policy.to_dict() if policy is not None else None,
            summary=policy.describe(n_visual) if policy is not None else "",
            ci=ci,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def comparison(rows: list[dict], samples: dict[str, list], boot) -> dict | None:
    """DOP's best row against the best baseline at one budget: the Rel. Avg. difference with
    a paired bootstrap interval (same resampled test samples for both)."""
    def best(kind):
        cands = [r for r in rows if r["kind"] == kind and r.get("rel_avg") is not None]
        return max(cands, key=lambda r: r["rel_avg"]) if cands else None

    a, b = best("dop"), best("baseline")
    if a is None or b is None:
        return None
    diff = boot.difference(samples[a["method"]], samples[b["method"]])
    if diff is None:
        return None
    return dict(diff, a=a["method"], b=b["method"], difference=a["rel_avg"] - b["rel_avg"])
