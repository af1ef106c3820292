"""`dop run`: the main job. Searches DOP policies from a few validation samples, builds the
token-pruning baselines at the same FLOPs budgets, evaluates all of them and the unpruned
model on a test split, and writes a report (report.md, pareto.png, policy_map.png,
results.json, every policy file). Rerun with the same --out to reuse finished stages.

    dop run                                   # the bundled demo model, defaults below
    dop run --model demo,demo-base            # one job per model, one report side by side
    dop run --model llava-hf/llava-1.5-7b-hf --data my_val.jsonl --test-data my_test.jsonl
"""

from __future__ import annotations

import datetime as _dt
import glob
import os
import sys
from dataclasses import replace

from ..distributed import is_main
from ..pipeline import (
    DEFAULT_BASELINES, DEFAULT_BUDGETS, DEFAULT_METHODS, DEFAULT_SPACES, DEFAULT_VERIFY, RunOptions, run_main_job,
    run_models,
)
from ..report.markdown import comparison_line, timing_note
from ..search.cost import BUDGET_HELP
from ..search.robust import AGGREGATES
from . import COMMANDS
from .options import COLUMNS_HELP, add_image_limit_option, apply_image_limit


def register(subparsers) -> None:
    d = RunOptions()
    p = subparsers.add_parser(
        "run", help=COMMANDS["run"],
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--model", default=d.model, metavar="demo|demo-base|HUB_ID|PATH[,...]",
                   help="model (default: demo); several, comma-separated (demo,demo-base), run the whole job "
                        "per model in OUT/<model>/ and report them side by side in OUT/report.md")
    p.add_argument("--data", default=d.data, metavar="SPEC", help="validation data for the search (default: shapes:val)")
    p.add_argument("--test-data", default=d.test_data, metavar="SPEC", help="test data (default: shapes:test)")
    p.add_argument("--columns", default=None, metavar="ROLE=COL,...", help=COLUMNS_HELP)
    p.add_argument("--samples", type=int, default=d.samples, help="validation samples (default: 25)")
    p.add_argument("--test-samples", type=int, default=d.test_samples, help="test samples (default: 200)")
    p.add_argument("--budgets", default=",".join(DEFAULT_BUDGETS), metavar="B1,B2",
                   help="FLOPs budgets, as in `dop search`: " + BUDGET_HELP.replace("%", "%%")
                        + " (default: tokens:1/9,tokens:2/9,tokens:1/3)")
    p.add_argument("--ranker", default=d.ranker, help="ranker for the DOP policies (default: vispruner)")
    p.add_argument("--space", default=",".join(DEFAULT_SPACES), metavar="S1,S2",
                   help="search spaces (default: dop,multigroup)")
    p.add_argument("--baselines", default=",".join(DEFAULT_BASELINES), metavar="M1,M2",
                   help="token-pruning baselines to compare with ('none' for none)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), metavar="M1,M2",
                   help="compared methods searched by their own rules, docs/methods.md ('none' for none; "
                        "default: gsop,shortv,vtw)")
    p.add_argument("--verify", type=int, default=DEFAULT_VERIFY, metavar="K",
                   help="verify each search: the true divergence of the chosen policy, token pruning, the blind "
                        f"policy and K random policies, on the searched and on held-out samples (default {DEFAULT_VERIFY}; "
                        "0: none)")
    p.add_argument("--verify-data", default=None, metavar="SPEC",
                   help="held-out samples for --verify (default: the samples of --data after the searched ones)")
    p.add_argument("--verify-samples", type=int, default=None, metavar="N",
                   help="held-out samples for --verify (default: as many as --samples)")
    p.add_argument("--candidates", type=int, default=d.candidates, metavar="K",
                   help="certified choice: the true divergence of the K best policies by proxy on the search "
                        f"samples, the closest chosen (default {d.candidates}; 1: the proxy's choice)")
    p.add_argument("--aggregate", choices=AGGREGATES, default=d.aggregate,
                   help="per-sample divergences aggregated by mean (default), median or trimmed (10%% dropped "
                        "at each end) in the proxy, the certified choice and the verification")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: runs/<timestamp>/)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--no-progress", action="store_true", help="no progress bars (the weight-loading bar included)")
    add_image_limit_option(p)
    p.set_defaults(func=run)


def _split(text: str) -> tuple[str, ...]:
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    return () if items == ("none",) else items


def run(args) -> int:
    apply_image_limit(args)

    opts = RunOptions(
        model=args.model, data=args.data, test_data=args.test_data, samples=args.samples,
        test_samples=args.test_samples, budgets=_split(args.budgets), ranker=args.ranker,
        spaces=_split(args.space), baselines=_split(args.baselines), methods=_split(args.methods), out=args.out, seed=args.seed,
        max_new_tokens=args.max_new_tokens, progress=not args.no_progress, columns=args.columns,
        verify=args.verify, verify_data=args.verify_data, verify_samples=args.verify_samples,
        candidates=args.candidates, aggregate=args.aggregate,
    )
    models = _split(args.model)
    if not models:
        raise ValueError("--model: give at least one model")

    if opts.out is None:
        opts.out = f"runs/{_dt.datetime.now():%Y%m%d-%H%M%S}"
    stages = "stages" if len(models) == 1 else "<model>/stages"
    kept = (f"the finished stages are kept in {opts.out}/{stages}; run the same command again "
            "(same --out) to resume from them")
    try:
        # both check every option (validate_options) before any work
        res = run_main_job(replace(opts, model=models[0])) if len(models) == 1 else run_models(opts, models)
    except KeyboardInterrupt:
        print(kept, file=sys.stderr)
        raise
    except OSError as e:  # a late system failure (disk full, folder gone): say what is kept
        if not glob.glob(os.path.join(glob.escape(opts.out), stages.replace("<model>", "*"))):
            raise
        raise OSError(f"{' '.join(str(e).split())}; {kept}") from None
    if not is_main():
        return 0  # rank 0 prints the headline
    for name, r in res.get("models", {"": res}).items():
        print(f"\nmodel {name}" if name else "")
        print(headline(r))
    where = "one folder per model" if "models" in res else "pareto.png, policy_map.png, results.json, policies/"
    print(f"\nreport: {res['out']}/report.md  ({where})")
    return 0


def headline(res: dict) -> str:
    trusted = (res.get("timing") or {}).get("trusted", True)
    ms_head = "prefill ms" if trusted else "prefill ms?"
    lines = [f"{'budget':<30} {'method':<22} {'FLOPs(dop)':>10} {'avg':>6} {'Rel.Avg (95% CI)':>19} {ms_head:>11}"]

    def ci(m):
        c = (m.get("ci") or {}).get("rel_avg")
        return f" ({100 * c[0]:.1f}-{100 * c[1]:.1f})" if c else ""

    u = res["unpruned"]
    lines.append(f"{'-':<30} {'unpruned':<22} {'100.0%':>10} {100 * u['average']:6.1f} {'100.0':>19} "
                 f"{u['prefill_ms'] or 0:11.1f}")
    for b in res["budgets"]:
        for m in b["methods"]:
            ff, ra = m["flops_fraction"], m["rel_avg"]
            ff_s = "-" if ff is None else f"{100 * ff:.1f}%"
            ra_s = "-" if ra is None else f"{100 * ra:.1f}{ci(m)}"
            lines.append(
                f"{b['label']:<30} {m['method']:<22} {ff_s:>10} {100 * m['average']:6.1f} {ra_s:>19} "
                f"{m['prefill_ms'] or 0:11.1f}"
            )

    for b in res["budgets"]:
        line = comparison_line(b)
        if line:
            lines.append(f"{b['label']}: {line}")
    note = timing_note(res.get("timing"))
    if note:
        lines.append(note)
    return "\n".join(lines)
