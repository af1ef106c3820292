"""The search stages of the main job: one per space (its divergence table serves every budget)
and one per compared method (docs/methods.md), each a resumable stage whose JSON the
planning reads (docs/design.md, "Search")."""

from __future__ import annotations

from ..search import METHODS, search, search_method
from ..search.divergence import prepare_samples
from ..search.verify import SampleSet
from .job import Job, verify_key


def run_searches(job: Job) -> None:
    """Every space's search, then every compared method's, each searched once for every
    budget on the validation samples (a space's table checkpointed as it fills; the policies
    measured on the held-out samples), into ``job.spaces`` and ``job.compared``."""
    (job.out / "tables").mkdir(exist_ok=True)
    o = job.opts
    for kind, names, stage, into in (("space", o.spaces, space_stage, job.spaces),
                                     ("method", o.methods, method_stage, job.compared)):
        for name in names:
            job.log(f"[search] {kind} {name!r}{_plan(job, kind)}")
            into[name] = job.stages.run(f"search-{name}", lambda name=name, stage=stage: stage(job, name),
                                        key=dict(job.common, **{kind: name}, budgets=list(o.budgets), **verify_key(job),
                                                 **(o.search_key() if kind == "space" else {})))


def _plan(job: Job, kind: str) -> str:
    """What a search stage will do, for the log."""
    n, held = len(job.val), len(job.heldout)
    if kind == "space":
        return (f": divergence table on {n} samples, then {len(job.opts.budgets)} budgets"
                + (f", verified on {held} held-out samples" if held else ""))
    return (f" on {n} samples, {len(job.opts.budgets)} budgets"
            + (f", then its policies on {held} held-out samples" if held else ""))


def space_stage(job: Job, space: str) -> dict:
    """A space's search as its stage holds it: the policy and predicted divergence per
    budget, the proxy curves, the verification and the certified choice's candidates."""
    opts = job.opts
    res = search(job.model, job.processor, job.val, budgets=list(opts.budgets), space=space, ranker=opts.ranker,
                 table=str(job.out / "tables" / f"table-{space}.json"), seed=opts.seed,
                 verify_k=opts.verify, verify_samples=job.heldout or None,
                 build_prompt=job.build_prompt, progress=opts.progress, meta={"model": opts.model},
                 candidates=opts.candidates, aggregate=opts.aggregate)
    proxy = res.table.proxy(res.space, opts.aggregate)
    summary = (f"{len(res.space.params)} parameters, {res.table.total()} table entries, "
               f"{res.layer_evals} decoder-layer evaluations (naive: {res.naive_layer_evals}), "
               + (f"certified choice: {res.certify_evaluations} candidates measured in {res.certify_layer_evals} "
                  "decoder-layer evaluations, " if res.certify_evaluations else "")
               + f"{res.wall_s:.1f} s")  # the wall time last: tests/test_distributed.py drops it
    return dict(
        policies={r.budget.spec: r.policy.to_dict() for r in res.results},
        predicted={r.budget.spec: r.predicted for r in res.results},
        curves={name: {str(v): kl for v, kl in pts.items()} for name, pts in proxy.items()},
        summary=summary, layer_evals=res.layer_evals, naive_layer_evals=res.naive_layer_evals, wall_s=res.wall_s,
        verification=verifications(res) if opts.verify else None, verify_data=job.heldout_where,
        certified={r.budget.spec: r.certified.to_dict() for r in res.results if r.certified} or None,
    )


def method_stage(job: Job, method: str) -> dict:
    """A compared method's search as its stage holds it: per budget its policy, whether it
    meets the budget, its in-sample and held-out divergence."""
    o = job.opts
    res = search_method(method, job.model, job.processor, job.val, budgets=list(o.budgets), ranker=o.ranker,
                        seed=o.seed, build_prompt=job.build_prompt, progress=o.progress, meta={"model": o.model})
    heldout = heldout_divergences(job, [(r.policy, r.policy.ranker) for r in res.results])
    budgets = {r.budget.spec: dict(policy=r.policy.to_dict(), met=r.met, note=r.note, in_sample=r.divergence,
                                   held_out=h, flops_fraction=r.flops[r.convention]["fraction"])
               for r, h in zip(res.results, heldout)}
    summary = (f"{res.evaluations} policies measured, {res.layer_evals} decoder-layer evaluations, "
               f"{res.wall_s:.1f} s")
    return dict(method=method, label=METHODS.get(method).label, budgets=budgets, summary=summary,
                layer_evals=res.layer_evals, evaluations=res.evaluations, wall_s=res.wall_s,
                verify_data=job.heldout_where)


def heldout_divergences(job: Job, policies: list) -> list:
    """The true first-token KL of each (policy, ranker) on the held-out samples (None each
    without any), the samples shared among the ranks as the verification shares them."""
    if not job.heldout:
        return [None] * len(policies)
    if job.heldout_set is None:  # prepared once per job, for every method
        job.heldout_set = SampleSet.of(job.model, prepare_samples(job.model, job.processor, job.heldout,
                                                                  job.build_prompt))
    return job.heldout_set.divergences(job.model, policies)


def verifications(res) -> dict:
    """Per budget, the in-sample and held-out verification without the random policies'
    rows (their count stays): what results.json and the report show."""
    def brief(v):
        if v is None:
            return None
        d = v.to_dict()
        d["random"] = len(v.random)
        return d

    return {r.budget.spec: {"predicted": r.predicted, "in_sample": brief(r.verification),
                            "held_out": brief(r.heldout)} for r in res.results}
