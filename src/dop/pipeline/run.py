"""The main job (`dop run`): search DOP policies, build the token-pruning baselines at the
same budgets, evaluate everything and the unpruned model on the test split, write a report.

Every stage is resumable: rerun with the same ``out`` and finished stages are reused. The
steps live beside this file: the options (:mod:`.options`), loading (:mod:`.job`), the
searches (:mod:`.searches`), what is evaluated at each budget (:mod:`.planning`), the rows
of results.json (:mod:`.rows`), the figures (:mod:`.figures`) and the timing note
(:mod:`.timing`).
"""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .. import distributed as dd
from ..baselines import BASELINES
from ..evaluate.bootstrap import Bootstrap
from ..evaluate.runner import EvalResult, evaluate
from ..outputs import check_output_dir, output_lock
from ..policy import Policy
from ..report import markdown
from ..report.stages import Stages, write_json_atomic
from .figures import draw_figures
from .job import Job, load_job, quiet, slug
from .options import RunOptions, validate_options
from .planning import BudgetPlan, MethodPlan, budget_for_baselines, plan_methods
from .rows import FORMAT, ResultRow, comparison
from .searches import run_searches
from .timing import machine, timing_note


def run_main_job(opts: RunOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Under several ranks (dop/distributed.py) the search and the evaluations share their
    samples; rank 0 alone logs, locks the output folder and writes files (the others return
    the same figures)."""

    validate_options(opts)
    out = Path(opts.out or dd.broadcast(f"runs/{_dt.datetime.now():%Y%m%d-%H%M%S}"))
    out.mkdir(parents=True, exist_ok=True)
    if not dd.is_main():
        return _run_locked(opts, out, quiet)
    with output_lock([out]):
        return _run_locked(opts, out, log)


def run_models(opts: RunOptions, models: Sequence[str], log: Callable[[str], None] = print) -> dict[str, Any]:
    """`dop run --model A,B`: the whole main job per model, each in ``OUT/<model>/`` (resumable
    on its own: a rerun with the same ``out`` reuses every model's finished stages), then one
    report with the models side by side: ``OUT/report.md`` and ``OUT/results.json`` (keyed
    per model). Every model's options are checked before any work."""
    models = list(models)
    dirs = {m: slug(m) for m in models}
    if len(set(dirs.values())) != len(models):
        raise ValueError(f"--model: give each model once (the output folders would clash: {', '.join(models)})")
    for m in models:
        validate_options(replace(opts, model=m, out=None))
    out = Path(opts.out or dd.broadcast(f"runs/{_dt.datetime.now():%Y%m%d-%H%M%S}"))
    if opts.out:
        check_output_dir("--out", opts.out)
    out.mkdir(parents=True, exist_ok=True)
    log = log if dd.is_main() else quiet
    with output_lock([out]):  # rank 0 alone locks (and writes)
        per = {}
        for i, m in enumerate(models, 1):
            log(f"[model] {m} ({i} of {len(models)}): the whole job in {out / dirs[m]}")
            per[m] = run_main_job(replace(opts, model=m, out=str(out / dirs[m])), log)
        results = dict(format="dop-run-models/1", models=per, dirs=dirs, out=str(out),
                       finished=_dt.datetime.now().isoformat(timespec="seconds"))
        if dd.is_main():
            write_json_atomic(out / "results.json", results)
            markdown.write_models_report(results, out / "report.md")
    return results


def _run_locked(opts: RunOptions, out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    (out / "policies").mkdir(exist_ok=True)
    # search stages, the unpruned evaluation, one evaluation per (budget, method); revised
    # once the baselines that cannot meet a budget are known
    n_search = len(opts.spaces) + len(opts.methods)
    stages = Stages(out, log, total=n_search + 1 + len(opts.budgets) * (n_search + len(opts.baselines)))
    stages.expected = {"search": n_search, "eval": stages.total - n_search}
    t_start = time.perf_counter()
    torch.manual_seed(opts.seed)
    job = load_job(opts, out, log, stages)
    budgets = [budget_for_baselines(spec, job.model, job.n_visual, job.n_text) for spec in opts.budgets]
    run_searches(job)
    plan, skipped = plan_methods(job, budgets)
    stages.total = n_search + 1 + len(plan)
    stages.expected = {"search": n_search, "eval": 1 + len(plan)}
    unpruned_d, boot, results_budgets = _evaluate_all(job, budgets, plan)
    if not dd.is_main():
        return dict(out=str(out), budgets=results_budgets,
                    unpruned=ResultRow.of("unpruned", "unpruned", unpruned_d, unpruned_d, None, None,
                                          job.n_visual).to_dict())
    results = _results(job, unpruned_d, boot, results_budgets, skipped)
    draw_figures(job, results)
    stages.times["total"] = time.perf_counter() - t_start
    results["stage_times"] = dict(stages.times)
    results["reused"] = list(stages.reused)
    write_json_atomic(out / "results.json", results)
    markdown.write_report(results, out / "report.md")
    results["out"] = str(out)
    return results


def _eval_stage(job: Job, name: str, policy=None, ranker=None, unpruned: EvalResult | None = None) -> Callable[[], dict]:
    def fn():
        res = evaluate(job.model, job.processor, job.test, policy=policy, ranker=ranker,
                       max_new_tokens=job.opts.max_new_tokens, progress=job.opts.progress,
                       build_prompt=job.build_prompt, baseline=unpruned, run_baseline=False,
                       seed=job.opts.seed, desc=name)
        return res.to_dict(with_samples=True)
    return fn


def _evaluate_all(job: Job, budgets: list[BudgetPlan], plan: list[MethodPlan]):
    """The unpruned model, then every planned method, on the test split: (the unpruned
    evaluation, its bootstrap, one result entry per budget)."""
    job.log(f"[eval] unpruned on {len(job.test)} test samples")
    test_key = dict(job.common, test=job.opts.test_data, n=len(job.test))
    unpruned_d = job.stages.run("eval-unpruned", _eval_stage(job, "unpruned"), key=test_key)
    unpruned = EvalResult.from_dict(unpruned_d)
    boot = Bootstrap.from_unpruned(unpruned_d["samples"], seed=job.opts.seed)
    results_budgets = []
    for b in budgets:
        rows, per_method = [], {}
        for m in (m for m in plan if m.budget.spec == b.spec):
            policy = Policy.from_dict(m.policy)
            fname = f"policies/{slug(b.spec)}-{slug(m.label)}.json"
            if dd.is_main():
                policy.to_json(job.out / fname)
            job.log(f"[eval] {b.label}: {m.label}")
            d = job.stages.run(f"eval-{slug(b.spec)}-{slug(m.label)}", _eval_stage(job, m.label, policy, m.ranker, unpruned),
                               key=dict(test_key, policy=m.policy, ranker=str(m.ranker)))
            rows.append(ResultRow.of(m.label, m.kind, d, unpruned_d, fname, policy, job.n_visual,
                                     ci=boot.method(d["samples"])).to_dict())
            per_method[m.label] = d["samples"]
        entry = b.to_dict()
        # a tokens:N budget on the plot's dop axis: where keeping N tokens before the LLM landed
        # on the test prompts (their mean text length), not at the first prompt's
        pre_llm = [r for r in rows if r["kind"] == "baseline" and BASELINES.get(r["method"]).prunes_before_llm
                   and r.get("flops_fraction") is not None]
        if b.tokens is not None and pre_llm:
            entry["dop_fraction"] = pre_llm[0]["flops_fraction"]
        results_budgets.append(dict(entry, methods=rows, comparison=comparison(rows, per_method, boot)))
    return unpruned_d, boot, results_budgets


def _results(job: Job, unpruned_d: dict, boot, results_budgets: list[dict], skipped: list) -> dict:
    """results.json (before the figures and stage times are added)."""
    unpruned_row = ResultRow.of("unpruned", "unpruned", unpruned_d, unpruned_d, None, None, job.n_visual,
                                ci=boot.method(unpruned_d["samples"])).to_dict()
    return dict(
        format=FORMAT,
        options=dict(job.opts.key(), out=str(job.out)),
        tasks=sorted(unpruned_d["tasks"]),
        num_test_samples=len(job.test),
        num_visual_tokens=job.n_visual,
        num_layers=job.num_layers,
        machine=machine(),
        finished=_dt.datetime.now().isoformat(timespec="seconds"),
        unpruned=unpruned_row,
        timing=timing_note([unpruned_row, *(m for b in results_budgets for m in b["methods"])], job.load_before),
        budgets=results_budgets,
        tables={s: dict(summary=r["summary"], verification=r.get("verification"), verify_data=r.get("verify_data"),
                        certified=r.get("certified"))
                for s, r in job.spaces.items()},
        compared={m: {k: v for k, v in r.items() if k != "budgets"} | dict(budgets={
            spec: {k: e[k] for k in ("met", "note", "in_sample", "held_out", "flops_fraction")}
            for spec, e in r["budgets"].items()}) for m, r in job.compared.items()},
        skipped=skipped,
    )
