"""The main job (`dop run`): search DOP policies, build the token-pruning baselines at the
same budgets, evaluate everything and the unpruned model on the test split, write a report.

Every stage is resumable: rerun with the same ``out`` and finished stages are reused.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import baselines as bl, distributed as dd
from .baselines import METHODS, resolve_budget, token_policy
from .evaluate.bootstrap import Bootstrap
from .evaluate.datasets import as_sample, load_dataset
from .evaluate.heldout import heldout_samples
from .evaluate.hf import is_hf_spec
from .evaluate.inputs import prompt_shape, sample_inputs
from .evaluate import loading
from .evaluate.loading import prompt_builder_for
from .evaluate.runner import EvalResult, evaluate
from .flops import count_flops, resolve_arch
from .models import get_adapter
from .outputs import check_output_dir, output_lock
from .policy import Policy
from .rankers import resolve_ranker
from .rankers.pdrop import default_stage_layers
from .report import markdown
from .report.plots import divergence_curves, pareto_plot, policy_map
from .report.stages import Stages, write_json_atomic
from .search import methods as compared, search
from .search.divergence import prepare_samples
from .search.verify import SampleSet
from .search.cost import DEFAULT_CONVENTION, parse_budget

DEFAULT_BUDGETS = ("tokens:1/9", "tokens:2/9", "tokens:1/3")
DEFAULT_BASELINES = ("vispruner", "cdpruner", "fastv", "pdrop", "dart", "spatial", "random")
DEFAULT_SPACES = ("dop", "multigroup")
DEFAULT_METHODS = ("gsop", "shortv", "vtw")  # the compared methods of docs/methods.md
METHOD_LABELS = {"gsop": "GSOP", "shortv": "ShortV", "vtw": "VTW"}
DEFAULT_VERIFY = 10  # random policies per search and budget in the held-out verification


@dataclass
class RunOptions:
    model: str = "demo"
    data: str = "shapes:val"
    test_data: str = "shapes:test"
    samples: int = 25
    test_samples: int = 200
    budgets: tuple[str, ...] = DEFAULT_BUDGETS
    ranker: str = "vispruner"
    spaces: tuple[str, ...] = DEFAULT_SPACES
    baselines: tuple[str, ...] = DEFAULT_BASELINES
    methods: tuple[str, ...] = DEFAULT_METHODS  # searched by their own rules (dop.search.methods)
    out: str | None = None
    seed: int = 0
    max_new_tokens: int = 10
    progress: bool = True
    attn_implementation: str = "sdpa"
    columns: str | None = None  # Hugging Face data sets: "role=column,..." (dop.evaluate.hf)
    # held-out verification of each search (docs/design.md, "Search"): K random policies, on
    # verify_data (default: the samples of data after the searched ones), verify_samples of them
    verify: int = DEFAULT_VERIFY
    verify_data: str | None = None
    verify_samples: int | None = None  # default: as many as samples

    def key(self) -> dict:
        d = asdict(self)
        d.pop("out")
        d.pop("progress")
        for name in ("columns", "verify_data", "verify_samples"):
            if d[name] is None:
                d.pop(name)  # keeps the keys of runs made before the option existed
        return d

    @property
    def heldout_n(self) -> int:
        return self.samples if self.verify_samples is None else self.verify_samples


def _machine() -> str:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    return f"{platform.machine()} {dev}, torch {torch.__version__}"


def validate_options(opts: RunOptions) -> None:
    """Every option that can be checked without the model, before any work (issue 16)."""

    for name in ("samples", "test_samples", "max_new_tokens", "heldout_n"):
        v = getattr(opts, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            flag = "verify_samples" if name == "heldout_n" else name
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive integer, got {v!r}")
    if isinstance(opts.verify, bool) or not isinstance(opts.verify, int) or opts.verify < 0:
        raise ValueError(f"--verify must be a non-negative integer, got {opts.verify!r}")
    if not opts.verify and (opts.verify_data or opts.verify_samples is not None):
        raise ValueError("--verify-data and --verify-samples apply only with --verify K > 0")
    if not opts.budgets:
        raise ValueError("--budgets: give at least one budget")
    for b in opts.budgets:
        parse_budget(b)
    if len(set(opts.budgets)) != len(opts.budgets):
        raise ValueError(f"--budgets: a budget is given twice ({', '.join(opts.budgets)})")
    bad = [s for s in opts.spaces if s not in DEFAULT_SPACES]
    if bad:
        raise ValueError(f"--space: unknown search space(s) {', '.join(map(repr, bad))}; known: {', '.join(DEFAULT_SPACES)}")
    bad = [m for m in opts.baselines if m not in METHODS]
    if bad:
        raise ValueError(f"--baselines: unknown method(s) {', '.join(map(repr, bad))}; known: {', '.join(METHODS)} "
                         "(or 'none')")
    bad = [m for m in opts.methods if m not in DEFAULT_METHODS]
    if bad:
        raise ValueError(f"--methods: unknown method(s) {', '.join(map(repr, bad))}; known: {', '.join(DEFAULT_METHODS)} "
                         "(or 'none')")
    if not opts.spaces and not opts.baselines and not opts.methods:
        raise ValueError("nothing to compare: give at least one search space, baseline or method")
    resolve_ranker(opts.ranker)
    if opts.out:
        check_output_dir("--out", opts.out)


def run_main_job(opts: RunOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Under several ranks (dop/distributed.py) the search and the evaluations share their
    samples; rank 0 alone logs, locks the output folder and writes files (the others return
    the same figures)."""

    validate_options(opts)
    out = Path(opts.out or dd.broadcast(f"runs/{_dt.datetime.now():%Y%m%d-%H%M%S}"))
    out.mkdir(parents=True, exist_ok=True)
    if not dd.is_main():
        return _run_locked(opts, out, _quiet)
    with output_lock([out]):
        return _run_locked(opts, out, log)


def run_models(opts: RunOptions, models: Sequence[str], log: Callable[[str], None] = print) -> dict[str, Any]:
    """`dop run --model A,B`: the whole main job per model, each in ``OUT/<model>/`` (resumable
    on its own: a rerun with the same ``out`` reuses every model's finished stages), then one
    report with the models side by side: ``OUT/report.md`` and ``OUT/results.json`` (keyed
    per model). Every model's options are checked before any work."""
    models = list(models)
    dirs = {m: _slug(m) for m in models}
    if len(set(dirs.values())) != len(models):
        raise ValueError(f"--model: give each model once (the output folders would clash: {', '.join(models)})")
    for m in models:
        validate_options(replace(opts, model=m, out=None))
    out = Path(opts.out or dd.broadcast(f"runs/{_dt.datetime.now():%Y%m%d-%H%M%S}"))
    if opts.out:
        check_output_dir("--out", opts.out)
    out.mkdir(parents=True, exist_ok=True)
    log = log if dd.is_main() else _quiet
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


@dataclass(frozen=True)
class BudgetPlan:
    """One budget of the main job: its spec and label, the (fraction, convention) the
    baselines are fitted to, the tokens of a ``tokens:N`` budget, and its place on the
    Pareto plot's dop axis."""

    spec: str
    label: str
    fraction: float
    convention: str
    tokens: int | None
    dop_fraction: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MethodPlan:
    """One evaluation of the main job: a method's policy at one budget."""

    budget: BudgetPlan
    label: str  # "DOP (dop)", "vispruner", ...
    kind: str  # "dop" or "baseline"
    policy: dict  # the policy as JSON (the stage key holds it)
    ranker: str | None


@dataclass
class _Job:
    """What every step of one main job reads: the options, the loaded model and data, the
    reference prompt's shape and the stage bookkeeping."""

    opts: RunOptions
    out: Path
    log: Callable[[str], None]
    stages: Stages
    model: Any
    processor: Any
    val: list
    test: list
    heldout: list  # samples of the held-out verification (empty: none)
    heldout_where: str
    build_prompt: Callable
    num_layers: int
    n_visual: int
    n_text: int
    load_before: list
    compared: dict = field(default_factory=dict)  # method -> its search (_method_search), once run
    heldout_set: Any = None  # the held-out samples prepared, with their reference logits (SampleSet)

    @property
    def common(self) -> dict:
        o = self.opts
        return dict(model=o.model, data=o.data, samples=o.samples, ranker=o.ranker, seed=o.seed)


def _run_locked(opts: RunOptions, out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    (out / "policies").mkdir(exist_ok=True)
    # search stages, the unpruned evaluation, one evaluation per (budget, method); revised
    # once the baselines that cannot meet a budget are known
    n_search = len(opts.spaces) + len(opts.methods)
    stages = Stages(out, log, total=n_search + 1 + len(opts.budgets) * (n_search + len(opts.baselines)))
    stages.expected = {"search": n_search, "eval": stages.total - n_search}
    t_start = time.perf_counter()
    torch.manual_seed(opts.seed)
    job = _load_job(opts, out, log, stages)
    budgets = [budget_for_baselines(spec, job.model, job.n_visual, job.n_text) for spec in opts.budgets]
    searches = _run_searches(job, len(budgets))
    job.compared = _run_method_searches(job)
    plan, skipped = _plan_methods(job, budgets, searches)
    stages.total = n_search + 1 + len(plan)
    stages.expected = {"search": n_search, "eval": 1 + len(plan)}
    unpruned_d, boot, results_budgets = _evaluate_all(job, budgets, plan)
    if not dd.is_main():
        return dict(out=str(out), budgets=results_budgets,
                    unpruned=_row("unpruned", "unpruned", unpruned_d, unpruned_d, None, None, job.n_visual))
    results = _results(job, unpruned_d, boot, results_budgets, searches, skipped)
    _draw_figures(job, results, searches)
    stages.times["total"] = time.perf_counter() - t_start
    results["stage_times"] = dict(stages.times)
    results["reused"] = list(stages.reused)
    write_json_atomic(out / "results.json", results)
    markdown.write_report(results, out / "report.md")
    results["out"] = str(out)
    return results


def _load_job(opts: RunOptions, out: Path, log: Callable[[str], None], stages: Stages) -> _Job:
    """The data sets (a bad one fails before the model loads), the model and the shape of the
    reference prompt (the first test sample)."""
    log(f"[load] model {opts.model!r}, validation {opts.data!r} ({opts.samples}), test {opts.test_data!r} ({opts.test_samples})")
    t0 = time.perf_counter()
    load_before = _load_average()

    def columns(spec):  # --columns names the columns of whichever of the two is a Hugging Face data set
        return opts.columns if is_hf_spec(spec) else None

    val = load_dataset(opts.data, limit=opts.samples, columns=columns(opts.data))
    test = load_dataset(opts.test_data, limit=opts.test_samples, columns=columns(opts.test_data))
    heldout, where = ([], "none: --verify 0") if not opts.verify else heldout_samples(
        opts.data, opts.samples, opts.heldout_n, opts.verify_data, opts.columns)
    if opts.verify and not heldout:
        log(f"[load] no held-out samples ({where}): the searches are verified in-sample only")
    # looked up when called, not bound at import: a test that replaces it for a while leaves no trace here
    model, processor = _load_model(opts, loading.load_model)
    if dd.is_distributed():
        model = model.to(dd.device_for())  # one device per rank: cuda:LOCAL_RANK, or the CPU
    build_prompt = prompt_builder_for(opts.model)
    adapter = get_adapter(model)
    n_visual, n_text = _prompt_shape(processor, adapter, build_prompt, test[0])
    stages.times["load"] = time.perf_counter() - t0
    return _Job(opts, out, log, stages, model, processor, val, test, heldout, where, build_prompt,
                adapter.num_layers, n_visual, n_text, load_before)


def _run_searches(job: _Job, n_budgets: int) -> dict[str, dict]:
    """One divergence table per space serves every budget (checkpointed as it fills)."""
    (job.out / "tables").mkdir(exist_ok=True)
    searches = {}
    for space in job.opts.spaces:
        job.log(f"[search] space {space!r}: divergence table on {len(job.val)} samples, then {n_budgets} budgets"
                + (f", verified on {len(job.heldout)} held-out samples" if job.heldout else ""))
        searches[space] = job.stages.run(
            f"search-{space}", lambda space=space: _search(job, space),
            key=dict(job.common, space=space, budgets=list(job.opts.budgets), **_verify_key(job)),
        )
    return searches


def _run_method_searches(job: _Job) -> dict[str, dict]:
    """The compared methods (VTW, ShortV, GSOP: docs/methods.md), each searched once for
    every budget on the validation samples, its policies then measured on the held-out ones."""
    found = {}
    for method in job.opts.methods:
        job.log(f"[search] method {method!r} on {len(job.val)} samples, {len(job.opts.budgets)} budgets"
                + (f", then its policies on {len(job.heldout)} held-out samples" if job.heldout else ""))
        found[method] = job.stages.run(f"search-{method}", lambda method=method: _method_search(job, method),
                                       key=dict(job.common, method=method, budgets=list(job.opts.budgets),
                                                **_verify_key(job)))
    return found


def _method_search(job: _Job, method: str) -> dict:
    o = job.opts
    res = compared.search(method, job.model, job.processor, job.val, budgets=list(o.budgets), ranker=o.ranker,
                          seed=o.seed, build_prompt=job.build_prompt, progress=o.progress, meta={"model": o.model})
    heldout = _heldout_divergences(job, [(r.policy, r.policy.ranker) for r in res.results])
    budgets = {r.budget.spec: dict(policy=r.policy.to_dict(), met=r.met, note=r.note, in_sample=r.divergence,
                                   held_out=h, flops_fraction=r.flops[r.convention]["fraction"])
               for r, h in zip(res.results, heldout)}
    summary = (f"{res.evaluations} policies measured, {res.layer_evals} decoder-layer evaluations, "
               f"{res.wall_s:.1f} s")
    return dict(method=method, label=METHOD_LABELS[method], budgets=budgets, summary=summary, layer_evals=res.layer_evals,
                evaluations=res.evaluations, wall_s=res.wall_s, verify_data=job.heldout_where)


def _heldout_divergences(job: _Job, policies: list) -> list:
    """The true first-token KL of each (policy, ranker) on the held-out samples (None each
    without any), the samples shared among the ranks as the verification shares them."""
    if not job.heldout:
        return [None] * len(policies)
    if job.heldout_set is None:  # prepared once per job, for every method
        job.heldout_set = SampleSet.of(job.model, prepare_samples(job.model, job.processor, job.heldout,
                                                                  job.build_prompt))
    return job.heldout_set.divergences(job.model, policies)


def _plan_methods(job: _Job, budgets: list[BudgetPlan], searches: dict) -> tuple[list[MethodPlan], list[dict]]:
    """Per budget, the plans of every planner of :data:`PLANNERS` in order (DOP per space,
    then the token-pruning baselines); a method that cannot meet a budget is skipped, with
    the reason."""
    plan, skipped = [], []
    for b in budgets:
        for planner in PLANNERS:
            plans, why = planner(job, b, searches)
            plan += plans
            skipped += why
    return plan, skipped


def _dop_plans(job: _Job, b: BudgetPlan, searches: dict) -> tuple[list[MethodPlan], list[dict]]:
    """The searched DOP policy of each space."""
    return [MethodPlan(b, f"DOP ({space})", "dop", searches[space]["policies"][b.spec], job.opts.ranker)
            for space in job.opts.spaces], []


def _baseline_plans(job: _Job, b: BudgetPlan, searches: dict) -> tuple[list[MethodPlan], list[dict]]:
    """The token-pruning baselines fitted to the budget."""
    plans, skipped = [], []
    for method in job.opts.baselines:
        try:
            pol, ranker = _baseline(job.model, method, b, job.n_visual, job.n_text, job.num_layers)
        except ValueError as e:
            job.log(f"[baseline] {method} at {b.spec}: skipped ({e})")
            skipped.append(dict(budget=b.spec, method=method, reason=str(e)))
            continue
        plans.append(MethodPlan(b, method, "baseline", pol.to_dict(), ranker))
    return plans, skipped


def _method_plans(job: _Job, b: BudgetPlan, searches: dict) -> tuple[list[MethodPlan], list[dict]]:
    """The compared methods' policies (docs/methods.md); one that cannot meet the budget is
    skipped with its note."""
    plans, skipped = [], []
    for method, r in job.compared.items():
        entry = r["budgets"][b.spec]
        if not entry["met"]:
            job.log(f"[method] {method} at {b.spec}: skipped ({entry['note']})")
            skipped.append(dict(budget=b.spec, method=METHOD_LABELS[method], reason=entry["note"]))
            continue
        plans.append(MethodPlan(b, METHOD_LABELS[method], "method", entry["policy"], entry["policy"].get("ranker")))
    return plans, skipped


# Who plans the evaluations at one budget: ``planner(job, budget, searches) -> (plans,
# skipped)``. A new method of `dop run` is one more function here.
PLANNERS = (_dop_plans, _method_plans, _baseline_plans)


def _eval_stage(job: _Job, name: str, policy=None, ranker=None, baseline=None) -> Callable[[], dict]:
    def fn():
        res = evaluate(job.model, job.processor, job.test, policy=policy, ranker=ranker,
                       max_new_tokens=job.opts.max_new_tokens, progress=job.opts.progress,
                       build_prompt=job.build_prompt, baseline=baseline, run_baseline=False,
                       seed=job.opts.seed, desc=name)
        return res.to_dict(with_samples=True)
    return fn


def _evaluate_all(job: _Job, budgets: list[BudgetPlan], plan: list[MethodPlan]):
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
            fname = f"policies/{_slug(b.spec)}-{_slug(m.label)}.json"
            if dd.is_main():
                policy.to_json(job.out / fname)
            job.log(f"[eval] {b.label}: {m.label}")
            d = job.stages.run(f"eval-{_slug(b.spec)}-{_slug(m.label)}", _eval_stage(job, m.label, policy, m.ranker, unpruned),
                               key=dict(test_key, policy=m.policy, ranker=str(m.ranker)))
            rows.append(dict(_row(m.label, m.kind, d, unpruned_d, fname, policy, job.n_visual), ci=boot.method(d["samples"])))
            per_method[m.label] = d["samples"]
        entry = b.to_dict()
        # a tokens:N budget on the plot's dop axis: where keeping N tokens before the LLM landed
        # on the test prompts (their mean text length), not at the first prompt's
        pre_llm = [r for r in rows if r["method"] in ("vispruner", "cdpruner", "spatial", "random")
                   and r.get("flops_fraction") is not None]
        if b.tokens is not None and pre_llm:
            entry["dop_fraction"] = pre_llm[0]["flops_fraction"]
        results_budgets.append(dict(entry, methods=rows, comparison=_comparison(rows, per_method, boot)))
    return unpruned_d, boot, results_budgets


def _results(job: _Job, unpruned_d: dict, boot, results_budgets: list[dict], searches: dict, skipped: list) -> dict:
    """results.json (before the figures and stage times are added)."""
    unpruned_row = dict(_row("unpruned", "unpruned", unpruned_d, unpruned_d, None, None, job.n_visual),
                        ci=boot.method(unpruned_d["samples"]))
    return dict(
        options=dict(job.opts.key(), out=str(job.out)),
        tasks=sorted(unpruned_d["tasks"]),
        num_test_samples=len(job.test),
        num_visual_tokens=job.n_visual,
        num_layers=job.num_layers,
        machine=_machine(),
        finished=_dt.datetime.now().isoformat(timespec="seconds"),
        unpruned=unpruned_row,
        timing=_timing_note([unpruned_row, *(m for b in results_budgets for m in b["methods"])], job.load_before),
        budgets=results_budgets,
        tables={s: dict(summary=r["summary"], verification=r.get("verification"), verify_data=r.get("verify_data"))
                for s, r in searches.items()},
        compared={m: {k: v for k, v in r.items() if k != "budgets"} | dict(budgets={
            spec: {k: e[k] for k in ("met", "note", "in_sample", "held_out", "flops_fraction")}
            for spec, e in r["budgets"].items()}) for m, r in job.compared.items()},
        skipped=skipped,
    )


def _draw_figures(job: _Job, results: dict, searches: dict) -> None:
    """The Pareto plot, the divergence curves, a map per chosen DOP policy beside its file,
    and the headline map: the first space's policy at the middle budget."""
    out, n_visual, budgets = job.out, job.n_visual, results["budgets"]
    points = [dict(method=m["method"], flops_fraction=m["flops_fraction"], rel_avg=m["rel_avg"],
                   rel_avg_ci=(m.get("ci") or {}).get("rel_avg"))
              for b in budgets for m in b["methods"]]
    pareto_plot(points, out / "pareto.png",
                title=f"{job.opts.model}: Rel. Avg. vs decoder FLOPs ({len(job.test)} test samples)",
                budgets=[(b["label"], b["dop_fraction"]) for b in budgets])
    for space, r in searches.items():
        curves = {name: [(int(v), kl) for v, kl in pts.items()] for name, pts in r["curves"].items()}
        if curves:
            divergence_curves(curves, out / f"divergence_{space}.png", title=f"Divergence table, space {space}")
            results["tables"][space]["plot"] = f"divergence_{space}.png"
    for b in budgets:
        for m in b["methods"]:
            if m["kind"] in ("dop", "method"):
                m["policy_map"] = m["policy_file"].replace(".json", ".png")
                policy_map(Policy.from_json(out / m["policy_file"]), n_visual, out / m["policy_map"],
                           title=_map_title(m, b, n_visual))
    if budgets and job.opts.spaces:
        b = budgets[len(budgets) // 2]
        m = next((m for m in b["methods"] if m["method"] == f"DOP ({job.opts.spaces[0]})"), None)
        if m is not None:
            title = _map_title(m, b, n_visual)
            policy_map(Policy.from_json(out / m["policy_file"]), n_visual, out / "policy_map.png", title=title)
            results["policy_map"] = dict(file="policy_map.png", title=title)


def _quiet(_msg: str) -> None:
    pass


def _load_model(opts: RunOptions, load_model):
    """load_model, without transformers' weight-loading bar when progress is off."""
    from transformers.utils import logging as hf_logging  # lazy: only to silence a bar

    quiet = not opts.progress and hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        return load_model(opts.model, attn_implementation=opts.attn_implementation)
    finally:
        if quiet:
            hf_logging.enable_progress_bar()


def _map_title(m: dict, b: dict, n_visual: int) -> str:
    """The policy map's title says what its cells show: the tokens the chosen policy processes
    at layer 0, beside the budget (a cost: the FLOPs of keeping N tokens, not N kept)."""

    keep = Policy.from_dict(m["policy"]).n_keep(n_visual)
    return f"{m['method']}, budget {_budget_words(b)}: processes {keep} of {n_visual} visual tokens at layer 0"


def _budget_words(b: dict) -> str:
    if b.get("tokens") is not None:
        return f"the FLOPs of keeping {b['tokens']} tokens"
    return f"{100 * b['fraction']:.1f}% of the decoder FLOPs ({b['convention']} convention)"


def _comparison(rows: list[dict], samples: dict[str, list], boot) -> dict | None:
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


BUSY_CV = 0.3  # per-sample prefill times spread more than this (std / mean): timing is noisy


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _timing_note(rows: list[dict], load_before: float | None) -> dict:
    """Whether the prefill-time column can be trusted: the 1-minute load average before and
    after the run against the CPU count, and the spread of each method's per-sample times."""
    cpus = os.cpu_count() or 1
    loads = [x for x in (load_before, _load_average()) if x is not None]
    for r in rows:
        r["prefill_noisy"] = (r.get("prefill_cv") or 0) > BUSY_CV
    noisy = sorted({r["method"] for r in rows if r["prefill_noisy"]})
    busy = bool(loads) and max(loads) > cpus
    return dict(cpus=cpus, load_average=loads, busy=busy, noisy=noisy, cv_threshold=BUSY_CV,
                trusted=not busy and not noisy)


def _slug(text: str) -> str:
    keep = [c if c.isalnum() else "-" for c in text.lower()]
    return "-".join(filter(None, "".join(keep).split("-")))


def _row(label, kind, d, unpruned_d, policy_file, policy, n_visual) -> dict:
    flops = d.get("flops") or {}
    base = (unpruned_d.get("flops") or {}).get("dop", {}).get("decoder")
    dec = flops.get("dop", {}).get("decoder")
    return dict(
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
        prefill_cv=_spread([s.get("prefill_ms") for s in d.get("samples", [])]),
        policy=policy.to_dict() if policy is not None else None,
        summary=policy.describe(n_visual) if policy is not None else "",
    )


def _spread(values: list) -> float | None:
    """Coefficient of variation (std / mean) of the per-sample prefill times."""
    xs = [float(v) for v in values if v is not None]
    if len(xs) < 2:
        return None
    mean = sum(xs) / len(xs)
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    return (var ** 0.5) / mean if mean > 0 else None


def _prompt_shape(processor, adapter, build_prompt, sample) -> tuple[int, int]:
    """(visual tokens of the first image, text tokens) of one prompt."""
    counts, text = prompt_shape(adapter, sample_inputs(processor, build_prompt, [as_sample(sample)])[0])
    if not counts:
        raise ValueError("the processor produced no image tokens for the first test sample")
    return counts[0], text


def budget_for_baselines(spec: str, model, n_visual: int, n_text: int) -> BudgetPlan:
    """A budget spec as (fraction, convention) for the baselines, a label, and the fraction
    of the unpruned decoder FLOPs in the dop convention (the Pareto plot's x axis).

    The grammar and conventions are `dop search`'s (:func:`dop.baselines.resolve_budget`):
    ``tokens:N`` / ``tokens:a/b`` in the paper convention, fractions and TFLOPs in dop's."""

    frac, conv, n = resolve_budget(spec, model, n_visual, n_text, DEFAULT_CONVENTION)
    if n is not None:
        rep = count_flops(model, token_policy(_num_layers(model), n_visual, n), num_visual_tokens=n_visual,
                          num_text_tokens=n_text)
        dop_frac = rep.decoder / rep.decoder_unpruned
        label = f"{spec} (FLOPs of {n} tokens)"
    else:
        dop_frac = frac
        label = f"{spec} ({100 * frac:.1f}% FLOPs, dop)"
    return BudgetPlan(spec=spec, label=label, fraction=frac, convention=conv, tokens=n, dop_fraction=dop_frac)


def _num_layers(model) -> int:
    return resolve_arch(model).decoder.num_layers


def _verify_key(job: _Job) -> dict:
    """The verification options of the search stages' key (none with --verify 0, so that the
    keys of runs made before held-out verification stay valid)."""
    o = job.opts
    return dict(verify=o.verify, verify_data=o.verify_data, verify_samples=len(job.heldout)) if o.verify else {}


def _verifications(res) -> dict:
    """Per budget, the in-sample and held-out verification without the random policies'
    rows (their count stays): what results.json and the report show."""
    def brief(v):
        if v is None:
            return None
        d = v.to_dict()
        d["random"] = len(v.random)
        return d

    return {r.budget.spec: {"predicted": r.solution.predicted, "in_sample": brief(r.verification),
                            "held_out": brief(r.heldout)} for r in res.results}


def _search(job: _Job, space: str) -> dict:
    opts = job.opts
    res = search(job.model, job.processor, job.val, budgets=list(opts.budgets), space=space, ranker=opts.ranker,
                 table=str(job.out / "tables" / f"table-{space}.json"), seed=opts.seed,
                 verify_k=opts.verify, verify_samples=job.heldout or None,
                 build_prompt=job.build_prompt, progress=opts.progress, meta={"model": opts.model})
    proxy = res.table.proxy(res.space)
    summary = (f"{len(res.space.params)} parameters, {res.table.total()} table entries, "
               f"{res.layer_evals} decoder-layer evaluations (naive: {res.naive_layer_evals}), "
               f"{res.wall_s:.1f} s")
    return dict(
        policies={r.budget.spec: r.policy.to_dict() for r in res.results},
        predicted={r.budget.spec: r.solution.predicted for r in res.results},
        curves={name: {str(v): kl for v, kl in pts.items()} for name, pts in proxy.items()},
        summary=summary, layer_evals=res.layer_evals, naive_layer_evals=res.naive_layer_evals, wall_s=res.wall_s,
        verification=_verifications(res) if opts.verify else None, verify_data=job.heldout_where,
    )


def _baseline(model, method: str, b: BudgetPlan, n_visual: int, n_text: int, L: int):
    """A published token pruner as (Policy, ranker spec) at budget ``b``, its stage layers
    scaled to the model's depth: FastV/DART prune after layer 2, PDrop at L/4, L/2, 3L/4.
    Where that costs more than the budget even with no token kept, the earliest layers are
    tried (K=1; PDrop at layers 1-2-3) before the method is reported as infeasible."""

    kw = dict(budget=b.fraction, convention=b.convention, visual_tokens=n_visual, text_tokens=n_text)
    if method == "pdrop":
        tries = [default_stage_layers(L), (1, 2, 3)]
        call = lambda layers: bl.pdrop(model, layers=layers, **kw)  # noqa: E731
    elif method in ("fastv", "dart"):
        tries = [min(2, L - 1), 1]
        call = lambda K: bl.baseline(method, model, K=K, **kw)  # noqa: E731
    else:
        return bl.baseline(method, model, **kw)
    error = None
    for t in dict.fromkeys(tries):
        try:
            return call(t)
        except ValueError as e:
            error = e  # keep the last (earliest layers) reason
    raise error
