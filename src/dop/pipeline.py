"""The main job (`dop run`): search DOP policies, build the token-pruning baselines at the
same budgets, evaluate everything and the unpruned model on the test split, write a report.

Every stage is resumable: rerun with the same ``out`` and finished stages are reused.
"""

from __future__ import annotations

import datetime as _dt
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

DEFAULT_BUDGETS = ("tokens:1/9", "tokens:2/9", "tokens:1/3")
DEFAULT_BASELINES = ("vispruner", "cdpruner", "fastv", "pdrop", "dart", "spatial", "random")
DEFAULT_SPACES = ("dop", "multigroup")


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
    out: str | None = None
    seed: int = 0
    max_new_tokens: int = 10
    progress: bool = True
    attn_implementation: str = "sdpa"
    columns: str | None = None  # Hugging Face data sets: "role=column,..." (dop.evaluate.hf)

    def key(self) -> dict:
        d = asdict(self)
        d.pop("out")
        d.pop("progress")
        if d["columns"] is None:
            d.pop("columns")  # keeps the stage keys of runs made before the option existed
        return d


def _machine() -> str:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    return f"{platform.machine()} {dev}, torch {torch.__version__}"


def run_main_job(opts: RunOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Under several ranks (dop/distributed.py) the search and the evaluations share their
    samples; rank 0 alone logs and writes files (the others return the same figures)."""
    from . import distributed as dd
    from .evaluate.datasets import load_dataset
    from .evaluate.loading import load_model, prompt_builder_for
    from .evaluate.runner import evaluate
    from .models import get_adapter
    from .report.stages import Stages, write_json_atomic

    if not dd.is_main():
        log = _quiet
    out = Path(opts.out or dd.broadcast(f"runs/{_dt.datetime.now():%Y%m%d-%H%M%S}"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "policies").mkdir(exist_ok=True)
    stages = Stages(out, log)
    t_start = time.perf_counter()
    torch.manual_seed(opts.seed)

    log(f"[load] model {opts.model!r}, validation {opts.data!r} ({opts.samples}), test {opts.test_data!r} ({opts.test_samples})")
    t0 = time.perf_counter()
    model, processor = load_model(opts.model, attn_implementation=opts.attn_implementation)
    if dd.is_distributed():
        model = model.to(dd.device_for())  # one device per rank: cuda:LOCAL_RANK, or the CPU
    build_prompt = prompt_builder_for(opts.model)
    from .evaluate.hf import is_hf_spec

    def columns(spec):  # --columns names the columns of whichever of the two is a Hugging Face data set
        return opts.columns if is_hf_spec(spec) else None

    val = load_dataset(opts.data, limit=opts.samples, columns=columns(opts.data))
    test = load_dataset(opts.test_data, limit=opts.test_samples, columns=columns(opts.test_data))
    adapter = get_adapter(model)
    n_visual, n_text = _prompt_shape(processor, adapter, build_prompt, test[0])
    budgets = [budget_for_baselines(spec, model, n_visual, n_text) for spec in opts.budgets]
    stages.times["load"] = time.perf_counter() - t0
    common = dict(model=opts.model, data=opts.data, samples=opts.samples, ranker=opts.ranker, seed=opts.seed)

    # -- search: one divergence table per space serves every budget (checkpointed as it fills)
    (out / "tables").mkdir(exist_ok=True)
    searches = {}
    for space in opts.spaces:
        log(f"[search] space {space!r}: divergence table on {len(val)} samples, then {len(budgets)} budgets")
        searches[space] = stages.run(
            f"search-{space}",
            lambda space=space: _search(model, processor, val, space, opts, build_prompt, out),
            key=dict(common, space=space, budgets=list(opts.budgets)),
        )

    # -- policies per budget: DOP per space, then the token-pruning baselines
    plan = []  # (budget, method label, kind, policy dict, ranker spec)
    skipped = []  # (budget spec, method, reason)
    for b in budgets:
        for space in opts.spaces:
            pol = searches[space]["policies"][b["spec"]]
            plan.append((b, f"DOP ({space})", "dop", pol, opts.ranker))
        for method in opts.baselines:
            try:
                pol, ranker = _baseline(model, method, b, n_visual, n_text, adapter.num_layers)
            except ValueError as e:
                log(f"[baseline] {method} at {b['spec']}: skipped ({e})")
                skipped.append(dict(budget=b["spec"], method=method, reason=str(e)))
                continue
            plan.append((b, method, "baseline", pol.to_dict(), ranker))

    # -- evaluation on the test split
    def eval_stage(name, policy=None, ranker=None, baseline=None):
        def fn():
            res = evaluate(model, processor, test, policy=policy, ranker=ranker,
                           max_new_tokens=opts.max_new_tokens, progress=opts.progress,
                           build_prompt=build_prompt, baseline=baseline, run_baseline=False,
                           seed=opts.seed, desc=name)
            return res.to_dict(with_samples=True)
        return fn

    from .policy import Policy

    log(f"[eval] unpruned on {len(test)} test samples")
    unpruned_d = stages.run("eval-unpruned", eval_stage("unpruned"), key=dict(common, test=opts.test_data, n=len(test)))
    unpruned_obj = _result_from_dict(unpruned_d)
    results_budgets = []
    for b in budgets:
        rows = []
        for bb, label, kind, pol_d, ranker in plan:
            if bb["spec"] != b["spec"]:
                continue
            policy = Policy.from_dict(pol_d)
            fname = f"policies/{_slug(b['spec'])}-{_slug(label)}.json"
            if dd.is_main():
                policy.to_json(out / fname)
            log(f"[eval] {b['label']}: {label}")
            d = stages.run(
                f"eval-{_slug(b['spec'])}-{_slug(label)}",
                eval_stage(label, policy, ranker, unpruned_obj),
                key=dict(common, test=opts.test_data, n=len(test), policy=pol_d, ranker=str(ranker)),
            )
            rows.append(_row(label, kind, d, unpruned_d, fname, policy, n_visual))
        results_budgets.append(dict(b, methods=rows))

    if not dd.is_main():
        return dict(out=str(out), unpruned=_row("unpruned", "unpruned", unpruned_d, unpruned_d, None, None, n_visual),
                    budgets=results_budgets)

    # -- report
    from .report.markdown import write_report
    from .report.plots import divergence_curves, pareto_plot, policy_map

    tasks = sorted(unpruned_d["tasks"])
    results = dict(
        options=dict(opts.key(), out=str(out)),
        tasks=tasks,
        num_test_samples=len(test),
        num_visual_tokens=n_visual,
        num_layers=adapter.num_layers,
        machine=_machine(),
        finished=_dt.datetime.now().isoformat(timespec="seconds"),
        unpruned=_row("unpruned", "unpruned", unpruned_d, unpruned_d, None, None, n_visual),
        budgets=results_budgets,
        tables={s: dict(summary=r["summary"]) for s, r in searches.items()},
        skipped=skipped,
    )
    points = [dict(method=m["method"], flops_fraction=m["flops_fraction"], rel_avg=m["rel_avg"])
              for b in results_budgets for m in b["methods"]]
    pareto_plot(points, out / "pareto.png", title=f"{opts.model}: Rel. Avg. vs decoder FLOPs ({len(test)} test samples)")
    for space, r in searches.items():
        curves = {name: [(int(v), kl) for v, kl in pts.items()] for name, pts in r["curves"].items()}
        if curves:
            divergence_curves(curves, out / f"divergence_{space}.png", title=f"Divergence table, space {space}")
            results["tables"][space]["plot"] = f"divergence_{space}.png"
    # a map per chosen DOP policy beside its file; the headline one is the first space's
    # policy at the middle budget
    for b in results_budgets:
        for m in b["methods"]:
            if m["kind"] == "dop":
                title = f"{m['method']} at {b['label']}"
                m["policy_map"] = m["policy_file"].replace(".json", ".png")
                policy_map(Policy.from_json(out / m["policy_file"]), n_visual, out / m["policy_map"], title=title)
    if results_budgets and opts.spaces:
        b = results_budgets[len(results_budgets) // 2]
        m = next((m for m in b["methods"] if m["method"] == f"DOP ({opts.spaces[0]})"), None)
        if m is not None:
            title = f"{m['method']} at {b['label']}"
            policy_map(Policy.from_json(out / m["policy_file"]), n_visual, out / "policy_map.png", title=title)
            results["policy_map"] = dict(file="policy_map.png", title=title)
    stages.times["total"] = time.perf_counter() - t_start
    results["stage_times"] = dict(stages.times)
    results["reused"] = list(stages.reused)
    write_json_atomic(out / "results.json", results)
    write_report(results, out / "report.md")
    results["out"] = str(out)
    return results


def _quiet(_msg: str) -> None:
    pass


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
        summary=_policy_summary(policy, n_visual) if policy is not None else "",
    )


def _policy_summary(policy, n_visual: int) -> str:
    bounds = policy.group_bounds(n_visual)
    parts = []
    for kind, ds in sorted(policy.depth.items()):
        parts.append(f"{kind}: " + ", ".join(f"ranks {s}-{e - 1} to layer {d}" for (s, e), d in zip(bounds, ds) if e > s))
    return "; ".join(parts) or "unpruned"


def _result_from_dict(d: dict):
    """An EvalResult-like object that evaluate() accepts as a baseline (tasks + samples)."""
    from .evaluate.metrics import TaskScore
    from .evaluate.runner import EvalResult, SampleResult

    samples = [SampleResult(**{k: v for k, v in s.items() if k in SampleResult.__dataclass_fields__})
               for s in d.get("samples", [])]
    tasks = {t: TaskScore(task=t, **{k: v for k, v in s.items() if k in TaskScore.__dataclass_fields__})
             for t, s in d["tasks"].items()}
    return EvalResult(samples=samples, tasks=tasks, average=d["average"], prefill_ms=d.get("prefill_ms"),
                      flops=d.get("flops"), num_visual_tokens=d.get("num_visual_tokens", 0),
                      num_text_tokens=d.get("num_text_tokens", 0))


def _prompt_shape(processor, adapter, build_prompt, sample) -> tuple[int, int]:
    """(visual tokens of the first image, text tokens) of one prompt."""
    image = sample.load_image() if hasattr(sample, "load_image") else sample["image"]
    prompt = build_prompt(processor, sample.question if hasattr(sample, "question") else sample["question"])
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    spans = adapter.image_spans(inputs["input_ids"], dict(inputs))
    if not spans:
        raise ValueError("the processor produced no image tokens for the first test sample")
    return spans[0].n, int(inputs["input_ids"].shape[1]) - sum(sp.n for sp in spans)


def budget_for_baselines(spec: str, model, n_visual: int, n_text: int) -> dict:
    """A budget spec as (fraction, convention) for the baselines, and a label.

    ``tokens:N`` / ``tokens:a/b`` are the paper convention's FLOPs of keeping N tokens (or
    that share); fractions and TFLOPs are the dop convention's, as in `dop search`."""
    from .flops import budget_from_tokens, count_flops
    from .search.cost import parse_budget

    b = parse_budget(spec)
    if b.kind == "tokens":
        n = b.tokens(n_visual)
        frac = budget_from_tokens(model, n, n_visual)
        return dict(spec=spec, label=f"{spec} ({n} tokens)", fraction=frac, convention="paper", tokens=n)
    if b.kind == "tflops":
        full = count_flops(model, None, num_visual_tokens=n_visual, num_text_tokens=n_text).decoder
        frac = b.value * 1e12 / full
        return dict(spec=spec, label=f"{spec}", fraction=frac, convention="dop", tokens=None)
    return dict(spec=spec, label=f"{100 * b.value:.1f}% FLOPs", fraction=b.value, convention="dop", tokens=None)


def _search(model, processor, val, space, opts, build_prompt, out) -> dict:
    from .search import search

    res = search(model, processor, val, budgets=list(opts.budgets), space=space, ranker=opts.ranker,
                 table=str(out / "tables" / f"table-{space}.json"), seed=opts.seed,
                 build_prompt=build_prompt, progress=opts.progress, meta={"model": opts.model})
    proxy = res.table.proxy(res.space)
    summary = (f"{len(res.space.params)} parameters, {res.table.total()} table entries, "
               f"{res.layer_evals} decoder-layer evaluations (naive: {res.naive_layer_evals}), "
               f"{res.wall_s:.1f} s")
    return dict(
        policies={r.budget.spec: r.policy.to_dict() for r in res.results},
        predicted={r.budget.spec: r.solution.predicted for r in res.results},
        curves={name: {str(v): kl for v, kl in pts.items()} for name, pts in proxy.items()},
        summary=summary, layer_evals=res.layer_evals, naive_layer_evals=res.naive_layer_evals, wall_s=res.wall_s,
    )


def _baseline(model, method: str, b: dict, n_visual: int, n_text: int, L: int):
    """A published token pruner as (Policy, ranker spec) at budget ``b``, its stage layers
    scaled to the model's depth: FastV/DART prune after layer 2, PDrop at L/4, L/2, 3L/4.
    Where that costs more than the budget even with no token kept, the earliest layers are
    tried (K=1; PDrop at layers 1-2-3) before the method is reported as infeasible."""
    from . import baselines as bl

    kw = dict(budget=b["fraction"], convention=b["convention"], visual_tokens=n_visual, text_tokens=n_text)
    if method == "pdrop":
        tries = [tuple(sorted({max(1, round(L * k / 4)) for k in (1, 2, 3)})), (1, 2, 3)]
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
