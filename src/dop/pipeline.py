"""The main job (`dop run`): search DOP policies, build the token-pruning baselines at the
same budgets, evaluate everything and the unpruned model on the test split, write a report.

Every stage is resumable: rerun with the same ``out`` and finished stages are reused.
"""

from __future__ import annotations

import datetime as _dt
import platform
import time
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import torch

DEFAULT_BUDGETS = ("tokens:1/9", "tokens:2/9", "tokens:1/3")
DEFAULT_BASELINES = ("vispruner", "cdpruner", "fastv", "pdrop", "spatial", "random")
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

    def key(self) -> dict:
        d = asdict(self)
        d.pop("out")
        d.pop("progress")
        return d


@dataclass
class Budget:
    label: str
    fraction: float  # of the unpruned decoder FLOPs
    spec: str
    tokens: int | None = None


def parse_budget(spec: str, model, n_visual: int) -> Budget:
    """``0.14`` / ``14%`` (fraction of decoder FLOPs) or ``tokens:N`` / ``tokens:1/9``
    (as many FLOPs as keeping N visual tokens, or that share of them; paper convention)."""
    from .flops import budget_from_tokens

    s = spec.strip()
    if s.startswith("tokens:"):
        val = s.split(":", 1)[1]
        try:
            frac = Fraction(val)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"budget {spec!r}: expected tokens:N or tokens:a/b") from None
        n = int(round(float(frac) * n_visual)) if frac < 1 or "/" in val or "." in val else int(frac)
        if not (1 <= n <= n_visual):
            raise ValueError(f"budget {spec!r}: keeps {n} tokens; must lie in [1, {n_visual}]")
        f = budget_from_tokens(model, n, n_visual)
        return Budget(f"{n} tokens ({100 * f:.1f}% FLOPs)", f, spec, n)
    try:
        f = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise ValueError(f"budget {spec!r}: expected a fraction (0.14), a percentage (14%) or tokens:N") from None
    if not (0 < f <= 1):
        raise ValueError(f"budget {spec!r}: a fraction of decoder FLOPs must lie in (0, 1]")
    return Budget(f"{100 * f:.1f}% FLOPs", f, spec)


def _machine() -> str:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    return f"{platform.machine()} {dev}, torch {torch.__version__}"


def run_main_job(opts: RunOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    from .evaluate.datasets import load_dataset
    from .evaluate.loading import load_model, prompt_builder_for
    from .evaluate.runner import evaluate
    from .models import get_adapter
    from .report.stages import Stages, write_json_atomic

    out = Path(opts.out or f"runs/{_dt.datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "policies").mkdir(exist_ok=True)
    stages = Stages(out, log)
    t_start = time.perf_counter()
    torch.manual_seed(opts.seed)

    log(f"[load] model {opts.model!r}, validation {opts.data!r} ({opts.samples}), test {opts.test_data!r} ({opts.test_samples})")
    t0 = time.perf_counter()
    model, processor = load_model(opts.model, attn_implementation=opts.attn_implementation)
    build_prompt = prompt_builder_for(opts.model)
    val = load_dataset(opts.data, limit=opts.samples)
    test = load_dataset(opts.test_data, limit=opts.test_samples)
    adapter = get_adapter(model)
    n_visual = _visual_tokens_per_image(model, processor, adapter, build_prompt, test[0])
    budgets = [parse_budget(b, model, n_visual) for b in opts.budgets]
    stages.times["load"] = time.perf_counter() - t0

    common = dict(model=opts.model, data=opts.data, samples=opts.samples, ranker=opts.ranker, seed=opts.seed)

    # -- search: one divergence table per space serves every budget
    from . import search_bridge as sb

    tables = {}
    for space in opts.spaces:
        log(f"[search] divergence table, space {space!r}")
        tables[space] = stages.run(
            f"table-{space}",
            lambda space=space: sb.build_table(model, processor, val, space, opts, build_prompt),
            key=dict(common, space=space),
        )

    # -- policies per budget: DOP per space, then the baselines
    plan = []  # (budget, method label, kind, policy dict, ranker)
    for b in budgets:
        for space in opts.spaces:
            pol = stages.run(
                f"policy-{space}-{b.spec.replace('/', '_').replace(':', '_')}",
                lambda space=space, b=b: sb.solve(model, tables[space], space, b.fraction, opts, n_visual),
                key=dict(common, space=space, budget=b.fraction),
            )
            plan.append((b, f"DOP ({space})", "dop", pol, opts.ranker))
        for method in opts.baselines:
            pol, ranker = sb.baseline(model, method, b.fraction, n_visual, opts)
            plan.append((b, method, "baseline", pol, ranker))

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
            if bb is not b:
                continue
            policy = Policy.from_dict(pol_d)
            fname = f"policies/{_slug(b.spec)}-{_slug(label)}.json"
            policy.to_json(out / fname)
            log(f"[eval] {b.label}: {label}")
            d = stages.run(
                f"eval-{_slug(b.spec)}-{_slug(label)}",
                eval_stage(label, policy, ranker, unpruned_obj),
                key=dict(common, test=opts.test_data, n=len(test), policy=pol_d, ranker=str(ranker)),
            )
            rows.append(_row(label, kind, d, unpruned_d, fname, policy, n_visual))
        results_budgets.append(dict(label=b.label, spec=b.spec, fraction=b.fraction, tokens=b.tokens, methods=rows))

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
        tables={s: sb.table_summary(t) for s, t in tables.items()},
    )
    points = [dict(method=m["method"], flops_fraction=m["flops_fraction"], rel_avg=m["rel_avg"])
              for b in results_budgets for m in b["methods"]]
    pareto_plot(points, out / "pareto.png", title=f"{opts.model}: Rel. Avg. vs decoder FLOPs ({len(test)} test samples)")
    for space, t in tables.items():
        curves = sb.table_curves(t)
        if curves:
            divergence_curves(curves, out / f"divergence_{space}.png", title=f"Divergence table, space {space}")
            results["tables"][space]["plot"] = f"divergence_{space}.png"
    dop_rows = [(b, m) for b in results_budgets for m in b["methods"] if m["kind"] == "dop"]
    if dop_rows:
        b, m = dop_rows[len(dop_rows) // 2] if len(dop_rows) > 1 else dop_rows[0]
        pm = Policy.from_json(out / m["policy_file"])
        title = f"{m['method']} at {b['label']}"
        policy_map(pm, n_visual, out / "policy_map.png", title=title)
        results["policy_map"] = dict(file="policy_map.png", title=title)
    stages.times["total"] = time.perf_counter() - t_start
    results["stage_times"] = dict(stages.times)
    results["reused"] = list(stages.reused)
    write_json_atomic(out / "results.json", results)
    write_report(results, out / "report.md")
    results["out"] = str(out)
    return results


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


def _visual_tokens_per_image(model, processor, adapter, build_prompt, sample) -> int:
    image = sample.load_image() if hasattr(sample, "load_image") else sample["image"]
    prompt = build_prompt(processor, sample.question if hasattr(sample, "question") else sample["question"])
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    spans = adapter.image_spans(inputs["input_ids"], dict(inputs))
    if not spans:
        raise ValueError("the processor produced no image tokens for the first test sample")
    return spans[0].n
