"""report.md of the main job, written from results.json's content."""

from __future__ import annotations

from typing import Any


def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100.0 * x:.{digits}f}"


def _flops(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, scale in (("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} FLOPs"


def method_table(rows: list[dict[str, Any]], tasks: list[str]) -> list[str]:
    head = ["method", "decoder FLOPs (dop)", "decoder FLOPs (paper)", "reduction",
            *tasks, "average", "Rel. Avg.", "prefill ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        cells = [
            r["method"], _flops(r.get("flops_dop")), _flops(r.get("flops_paper")),
            "-" if r.get("flops_fraction") is None else f"{100 * (1 - r['flops_fraction']):.1f}%",
            *[_pct(r.get("tasks", {}).get(t)) for t in tasks],
            _pct(r.get("average")), _pct(r.get("rel_avg")),
            "-" if r.get("prefill_ms") is None else f"{r['prefill_ms']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_report(results: dict[str, Any], path) -> None:
    o = results["options"]
    tasks = results["tasks"]
    L = []
    L.append("# dop run report")
    L.append("")
    L.append(f"Model `{o['model']}`; validation `{o['data']}` ({o['samples']} samples); test `{o['test_data']}` "
             f"({results['num_test_samples']} samples); ranker `{o['ranker']}`; search spaces "
             f"{', '.join('`' + s + '`' for s in o['spaces'])}; seed {o['seed']}. "
             f"{results['num_visual_tokens']} visual tokens per image, {results['num_layers']} decoder layers. "
             f"Written {results['finished']} on {results['machine']}.")
    L.append("")
    L.append("Accuracies are percentages on the test split; Rel. Avg. is the mean over tasks of pruned / "
             "unpruned accuracy; FLOPs are decoder prefill FLOPs per sample (dop: all matrix products "
             "of the prefill; paper: the token-pruning papers' convention, visual tokens only); "
             "reduction is against the unpruned decoder (dop convention).")
    L.append("")
    L.append("![Pareto front](pareto.png)")
    L.append("")
    for b in results["budgets"]:
        L.append(f"## Budget: {b['label']}")
        L.append("")
        L.append(f"At most {100 * b['fraction']:.1f}% of the unpruned decoder FLOPs.")
        L.append("")
        L.extend(method_table([results["unpruned"], *b["methods"]], tasks))
        L.append("")
        for sk in results.get("skipped", []):
            if sk["budget"] == b["spec"]:
                L.append(f"- {sk['method']} is not in this table: {sk['reason']}")
        if any(sk["budget"] == b["spec"] for sk in results.get("skipped", [])):
            L.append("")
    L.append("## Chosen DOP policies")
    L.append("")
    for b in results["budgets"]:
        for m in b["methods"]:
            if m.get("kind") != "dop":
                continue
            L.append(f"- {b['label']}, {m['method']}: `{m['policy_file']}` ([map]({m.get('policy_map', '')})) — "
                     f"{m.get('summary', '')}")
    if results.get("policy_map"):
        L.append("")
        L.append(f"![Policy map]({results['policy_map']['file']})")
        L.append("")
        L.append(f"Policy map of {results['policy_map']['title']}.")
    L.append("")
    L.append("## Divergence table")
    L.append("")
    for space, info in results.get("tables", {}).items():
        L.append(f"- space `{space}`: {info.get('summary', '')}")
        if info.get("plot"):
            L.append(f"  ![divergence curves, {space}]({info['plot']})")
    L.append("")
    L.append("## Stage wall times")
    L.append("")
    L.append("| stage | seconds | reused |")
    L.append("|---|---|---|")
    for name, secs in results["stage_times"].items():
        L.append(f"| {name} | {secs:.1f} | {'yes' if name in results.get('reused', []) else ''} |")
    L.append("")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(L))
