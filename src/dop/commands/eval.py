"""`dop eval`: accuracy, FLOPs and prefill time of a model, pruned or not, on a data set.

    dop eval --model demo --data shapes:test
    dop eval --model demo --data shapes:test --policy policy.json --ranker vispruner --json out.json
    dop eval --model llava-hf/llava-1.5-7b-hf --data my_vqa/data.jsonl --limit 200

Everything that can be checked is checked before the first sample is run (data set lines,
image files, policy file, model name, policy layer count, output folder); ``--json`` is
written atomically (temporary file + rename), so a failed run leaves no half-written file.
The JSON schema is documented in docs/eval.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import sys

import torch
import transformers

import dop

from .. import distributed
from ..evaluate.bootstrap import Bootstrap
from ..evaluate.datasets import load_dataset
from ..evaluate.loading import num_decoder_layers, prompt_builder_for
from ..evaluate.runner import DEFAULT_MAX_NEW_TOKENS, evaluate
from ..jsonio import write_json_atomic  # noqa: F401  (re-exported for other commands)
from ..outputs import check_output_file, output_lock, write_or_rescue
from ..policy import Policy
from ..rankers import resolve_ranker
from . import COMMANDS
from .options import COLUMNS_HELP, DATA_METAVAR, add_model_runtime_options, apply_image_limit, load_model_quietly

FORMAT = "dop-eval/1"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help=COMMANDS["eval"],
        description=(
            "Greedy generation over a data set (--batch-size prompts at a time); prints accuracy per task "
            "(F1 for yes/no tasks), the average, Rel. Avg. against the unpruned model when a "
            "policy is given, decoder FLOPs in both conventions and the mean prefill time."
        ),
    )
    p.add_argument("--model", required=True, metavar="demo|demo-base|HUB_ID|PATH",
                   help="'demo', 'demo-base' (its control, not trained for pruning), a hub id (owner/name) "
                        "or a local checkpoint folder")
    p.add_argument("--data", required=True, metavar=DATA_METAVAR,
                   help="the synthetic benchmark split, a JSONL file (or folder holding data.jsonl), or a "
                        "Hugging Face data set: parquet files, a save_to_disk folder or a hub id with a split")
    p.add_argument("--columns", metavar="ROLE=COL,...", help=COLUMNS_HELP)
    p.add_argument("--policy", metavar="FILE", help="a policy JSON file (dop-policy/1 or /2) to apply")
    p.add_argument("--ranker", metavar="NAME", help="visual-token ranker (overrides the policy's)")
    p.add_argument("--tasks", metavar="T1,T2", help="only these tasks (comma-separated)")
    p.add_argument("--limit", type=int, metavar="N",
                   help="evaluate the first N samples (shapes: generate N; default 300)")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="K",
                   help="generation length cap (default 10)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="torch seed set before each pass, for random rankers (default 0); "
                        "the shapes data seed is part of --data")
    p.add_argument("--no-baseline", action="store_true",
                   help="with --policy, skip the unpruned pass (no Rel. Avg.)")
    p.add_argument("--batch-size", type=int, default=1, metavar="N",
                   help="prompts per forward, padded on the left (default 1); results equal batch size 1's")
    p.add_argument("--json", metavar="OUT", help="write every figure to this JSON file (docs/eval.md)")
    add_model_runtime_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # ---- checks that need nothing loaded
    if args.ranker and not args.policy:
        raise ValueError("--ranker applies only together with --policy")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be a positive integer, got {args.limit}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be a positive integer, got {args.threads}")
    if args.json and distributed.is_main():  # under torchrun rank 0 alone writes it
        check_output_file("--json", args.json)
    apply_image_limit(args)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None

    policy = Policy.from_json(args.policy) if args.policy else None
    if policy is not None:
        resolve_ranker(args.ranker or policy.ranker)  # an unknown name fails here, listing the known

    samples = load_dataset(args.data, limit=args.limit, tasks=tasks, columns=args.columns)

    # ---- the model, then the policy against it, still before any sample is run
    threads_before = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        with output_lock([args.json]):
            return _run_loaded(args, policy, samples, tasks)
    finally:
        torch.set_num_threads(threads_before)  # main() may be called in-process


def _run_loaded(args, policy, samples, tasks) -> int:
    dtype = getattr(torch, args.dtype)
    device = distributed.device_for(args.device)
    model, processor = load_model_quietly(args, dtype)
    model = model.to(device)
    if policy is not None:
        policy = policy.check_layers(num_decoder_layers(model))
    max_new = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS

    result = evaluate(
        model, processor, samples, policy=policy, ranker=args.ranker, max_new_tokens=max_new,
        progress=not args.no_progress, build_prompt=prompt_builder_for(args.model),
        run_baseline=not args.no_baseline, seed=args.seed, batch_size=args.batch_size,
    )

    if not distributed.is_main():
        return 0  # rank 0 prints the report and writes the JSON
    print(format_report(result, model=args.model, data=args.data, policy_file=args.policy))
    if args.json:
        doc = to_json_document(
            result, model=args.model, data=args.data, policy_file=args.policy,
            max_new_tokens=max_new, seed=args.seed, limit=args.limit, tasks=tasks,
            device=device, dtype=args.dtype,
        )
        write_or_rescue("--json", args.json, lambda path: write_json_atomic(path, doc))
        print(f"wrote {args.json}")
    return 0


# ---------------------------------------------------------------------- report
def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100.0 * x:.1f}%"


def _flops(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, scale in (("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6), ("kFLOPs", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} FLOPs"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} ms"


def rel_avg_interval(result) -> list[float] | None:
    """95% bootstrap interval of Rel. Avg., paired with the unpruned pass on the same samples
    (``dop.evaluate.bootstrap``); None without an unpruned pass or a Rel. Avg."""
    if result.baseline is None or result.rel_avg is None:
        return None
    try:
        boot = Bootstrap.from_unpruned([s.to_dict() for s in result.baseline.samples])
        return boot.method([s.to_dict() for s in result.samples])["rel_avg"]
    except ValueError:  # the two passes did not run the same samples
        return None


def format_report(result, *, model: str, data: str, policy_file: str | None = None) -> str:
    """The table ``dop eval`` prints."""
    lines = [f"model {model}   data {data} ({len(result.samples)} samples)"]
    if result.policy is not None:
        ranker = result.ranker or result.policy.ranker or "default"
        shown = "(inline JSON)" if policy_file and policy_file.lstrip().startswith("{") else policy_file
        lines.append(f"policy {shown or '(given)'}   ranker {ranker}")
    lines.append("")
    lines += _score_table(result)
    lines.append("")
    lines += _cost_table(result)
    return "\n".join(lines)


def _aligned(row: list[str], widths: list[int]) -> str:
    """A table row: the first column left-aligned, the others right-aligned."""
    return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))


def _score_table(result) -> list[str]:
    """Accuracy (and F1) per task and on average, beside the unpruned run's when there is one,
    with Rel. Avg. and its interval."""
    base, ci = result.baseline, rel_avg_interval(result)
    cols = ["task", "n", "accuracy", "F1"]
    if base is not None:
        cols += ["unpruned", "unpr. F1", "ratio"]
    rows = []
    for t, s in result.tasks.items():
        row = [t, str(s.n), _pct(s.accuracy), _pct(s.f1) if s.yes_no else ""]
        if base is not None:
            b = base.tasks[t]
            ratio = s.accuracy / b.accuracy if b.accuracy > 0 else None
            row += [_pct(b.accuracy), _pct(b.f1) if b.yes_no else "", _pct(ratio)]
        rows.append(row)
    avg = ["average", str(len(result.samples)), _pct(result.average), ""]
    if base is not None:
        avg += [_pct(base.average), "", ""]
    rows.append(avg)
    if base is not None:
        rows.append(["Rel. Avg.", "", _pct(result.rel_avg), "", "", "", ""])
        if ci is not None:
            rows.append(["  95% CI", "", f"{100 * ci[0]:.1f}-{100 * ci[1]:.1f}%", "", "", "", ""])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    n_foot = 1 + (base is not None) + (ci is not None)
    rule = "  ".join("-" * w for w in widths)
    return ([_aligned(cols, widths), rule] + [_aligned(r, widths) for r in rows[:-n_foot]] + [rule]
            + [_aligned(r, widths) for r in rows[len(result.tasks):]])


def _cost_table(result) -> list[str]:
    """Costs: pruned vs unpruned side by side when both exist."""
    base = result.baseline
    heads = ["cost", "pruned" if result.policy is not None else "model"] + (["unpruned", "ratio"] if base is not None else [])
    cost_rows = []

    def add(name, a, b, f):
        row = [name, f(a)]
        if base is not None:
            row += [f(b), f"{a / b:.3f}" if a is not None and b else "-"]
        cost_rows.append(row)

    fl, bfl = result.flops or {}, (base.flops if base is not None else None) or {}
    add("decoder FLOPs (dop)", fl.get("dop", {}).get("decoder"), bfl.get("dop", {}).get("decoder"), _flops)
    # the paper convention counts multiply-adds over the visual tokens: MACs, named so
    add("decoder MACs (paper)", fl.get("paper", {}).get("decoder"), bfl.get("paper", {}).get("decoder"),
        lambda x: _flops(x).replace("FLOPs", "MACs"))
    add("total FLOPs (dop)", fl.get("dop", {}).get("total"), bfl.get("dop", {}).get("total"), _flops)
    add("mean prefill time", result.prefill_ms, base.prefill_ms if base is not None else None, _ms)
    add("visual tokens / image", result.num_visual_tokens, base.num_visual_tokens if base is not None else None,
        lambda x: "-" if x is None else f"{x:.1f}")
    cw = [max(len(h), *(len(r[i]) for r in cost_rows)) for i, h in enumerate(heads)]
    return [_aligned(heads, cw), "  ".join("-" * w for w in cw)] + [_aligned(r, cw) for r in cost_rows]


def to_json_document(result, *, model, data, policy_file, max_new_tokens, seed, limit, tasks,
                     device, dtype) -> dict:
    """The ``--json`` document (schema ``dop-eval/1``, see docs/eval.md)."""
    doc = {
        "format": FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "data": data,
        "tasks_filter": tasks,
        "limit": limit,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        # null for inline policy JSON: the policy itself is under "policy"
        "policy_file": None if policy_file and policy_file.lstrip().startswith("{") else policy_file,
    }
    doc.update(result.to_dict())
    base = result.baseline
    if base is not None:
        b = base.to_dict()
        for k in ("policy", "ranker", "rel_avg"):
            b.pop(k, None)
        doc["unpruned"] = b
        doc["rel_avg_ci"] = rel_avg_interval(result)
    else:
        doc["unpruned"] = None
    doc["environment"] = {
        "dop": dop.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "dtype": dtype,
        "torch_threads": torch.get_num_threads(),
    }
    return doc


if __name__ == "__main__":  # pragma: no cover
    from dop.cli import main

    sys.exit(main(["eval", *sys.argv[1:]]))
