"""report.md of the main job, written from results.json's content."""

from __future__ import annotations

from typing import Any

from .certified import certified_section


def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100.0 * x:.{digits}f}"


def _flops(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, scale in (("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} FLOPs"


def _ci(x: float | None, ci) -> str:
    """``97.4 (95.9-98.8)``: a percentage and its bootstrap interval."""
    if x is None:
        return "-"
    return _pct(x) if not ci else f"{_pct(x)} ({_pct(ci[0])}-{_pct(ci[1])})"


def method_table(rows: list[dict[str, Any]], tasks: list[str], timing: dict | None = None) -> list[str]:
    trusted = timing is None or timing.get("trusted", True)
    time_head = "prefill ms" if trusted else "prefill ms (unreliable, see note)"
    head = ["method", "decoder FLOPs (dop)", "decoder MACs (paper)", "reduction (dop)",
            *tasks, "average", "Rel. Avg. (95% CI)", time_head]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        ci = r.get("ci") or {}
        ms = "-" if r.get("prefill_ms") is None else f"{r['prefill_ms']:.1f}" + (" *" if r.get("prefill_noisy") else "")
        cells = [
            r["method"], _flops(r.get("flops_dop")), _macs(r.get("flops_paper")),
            "-" if r.get("flops_fraction") is None else f"{100 * (1 - r['flops_fraction']):.1f}%",
            *[_pct(r.get("tasks", {}).get(t)) for t in tasks],
            _pct(r.get("average")), _ci(r.get("rel_avg"), ci.get("rel_avg")), ms,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _macs(x: float | None) -> str:
    return _flops(x).replace("FLOPs", "MACs")


def timing_note(timing: dict | None) -> str | None:
    """A sentence saying why the prefill times cannot be compared, or None when they can."""
    if not timing or timing.get("trusted", True):
        return None
    why = []
    if timing.get("busy"):
        loads = ", ".join(f"{x:.1f}" for x in timing.get("load_average", []))
        why.append(f"the machine was busy (load average {loads} on {timing['cpus']} CPUs)")
    if timing.get("noisy"):
        why.append(f"per-sample times spread by more than {100 * timing['cv_threshold']:.0f}% (std / mean) for "
                   f"{', '.join(timing['noisy'])} (marked *)")
    return ("Prefill times are not reliable here: " + "; ".join(why) + ". Compare FLOPs, or rerun on a quiet "
            "machine (e.g. `dop eval --threads 1`) before reading speed from them.")


def comparison_line(b: dict) -> str | None:
    c = b.get("comparison")
    if not c:
        return None
    lo, hi = c["interval"]
    verdict = ("beyond the noise" if c["beyond_noise"]
               else "within the noise: the interval contains 0")
    return (f"Paired comparison on the same test samples: {c['a']} - {c['b']} (the best baseline here) = "
            f"{100 * c['difference']:+.1f} points of Rel. Avg., 95% bootstrap interval "
            f"[{100 * lo:+.1f}, {100 * hi:+.1f}]: {verdict}.")


def write_report(results: dict[str, Any], path) -> None:
    L = _header(results)
    for b in results["budgets"]:
        L.extend(_budget_section(results, b))
    L.extend(_chosen_policies(results))
    L.extend(verification_section(results))
    L.extend(certified_section(results))
    L.extend(compared_section(results))
    L.extend(_tables_and_times(results))
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(L))


def _choice_words(o: dict) -> str:
    """How the searches chose (options of runs made before the certified choice: the proxy)."""
    k, how = o.get("candidates", 1), o.get("aggregate", "mean")
    by = "" if how == "mean" else f", divergences aggregated by the {how}"
    if k == 1:
        return "policies chosen by the proxy" + by
    return f"certified choice among the {k} best policies by proxy" + by


def _header(results: dict[str, Any]) -> list[str]:
    """Title, what was run, how to read the figures, the Pareto plot and the timing note."""
    o = results["options"]
    L = ["# dop run report", ""]
    L.append(f"Model `{o['model']}`; validation `{o['data']}` ({o['samples']} samples); test `{o['test_data']}` "
             f"({results['num_test_samples']} samples); ranker `{o['ranker']}`; search spaces "
             f"{', '.join('`' + s + '`' for s in o['spaces'])}; seed {o['seed']}; "
             f"{_choice_words(o)}. "
             f"{results['num_visual_tokens']} visual tokens per image, {results['num_layers']} decoder layers. "
             f"Written {results['finished']} on {results['machine']}.")
    L.append("")
    L.append("Accuracies are percentages on the test split; Rel. Avg. is the mean over tasks of pruned / "
             "unpruned accuracy, with a 95% bootstrap interval (test samples resampled within each task, "
             "the same resamples for every method, so differences are paired); decoder FLOPs per sample "
             "are given in both conventions, each named: dop (2 FLOPs per multiply-add of every matrix "
             "product of the prefill, text tokens included) and paper (multiply-adds over the visual "
             "tokens only, as the token-pruning papers count); reduction is against the unpruned decoder "
             "in the dop convention, the Pareto plot's x axis.")
    L += ["", "![Pareto front](pareto.png)", ""]
    note = timing_note(results.get("timing"))
    if note:
        L += [note, ""]
    return L


def _budget_section(results: dict[str, Any], b: dict) -> list[str]:
    """One budget: its limit, the method table, the paired comparison, the skipped methods."""
    L = [f"## Budget: {b['label']}", ""]
    conv = b.get("convention", "dop")
    same = f" ({100 * b['dop_fraction']:.1f}% in the dop convention)" if conv != "dop" and b.get("dop_fraction") else ""
    L += [f"At most {100 * b['fraction']:.1f}% of the unpruned decoder FLOPs in the {conv} convention{same}.", ""]
    L.extend(method_table([results["unpruned"], *b["methods"]], results["tasks"], results.get("timing")))
    L.append("")
    line = comparison_line(b)
    if line:
        L += [line, ""]
    skipped = [sk for sk in results.get("skipped", []) if sk["budget"] == b["spec"]]
    L += [f"- {sk['method']} is not in this table: {sk['reason']}" for sk in skipped]
    if skipped:
        L.append("")
    return L


def _chosen_policies(results: dict[str, Any]) -> list[str]:
    L = ["## Chosen DOP policies", ""]
    for b in results["budgets"]:
        for m in b["methods"]:
            if m.get("kind") != "dop":
                continue
            L.append(f"- {b['label']}, {m['method']}: `{m['policy_file']}` ([map]({m.get('policy_map', '')})) — "
                     f"{m.get('summary', '')}")
    if results.get("policy_map"):
        L += ["", f"![Policy map]({results['policy_map']['file']})", "",
              f"Policy map of {results['policy_map']['title']}."]
    L.append("")
    return L


def _tables_and_times(results: dict[str, Any]) -> list[str]:
    L = ["## Divergence table", ""]
    for space, info in results.get("tables", {}).items():
        L.append(f"- space `{space}`: {info.get('summary', '')}")
        if info.get("plot"):
            L.append(f"  ![divergence curves, {space}]({info['plot']})")
    L += ["", "## Stage wall times", "", "| stage | seconds | reused |", "|---|---|---|"]
    for name, secs in results["stage_times"].items():
        L.append(f"| {name} | {secs:.1f} | {'yes' if name in results.get('reused', []) else ''} |")
    L.append("")
    return L


def _kl(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def verification_section(results: dict[str, Any]) -> list[str]:
    """Each search's chosen policy, token pruning at the same FLOPs and the blind policy, by
    their true first-token KL on the searched samples and on held-out ones, beside the
    proxy's prediction and its Spearman over random policies (docs/design.md, "Search")."""
    tables = {s: t for s, t in results.get("tables", {}).items() if t.get("verification")}
    if not tables:
        return []
    L = ["## Divergence from the unpruned model: in-sample and held-out", ""]
    head = ["budget", "predicted (proxy)", "chosen: in-sample", "chosen: held-out", "token pruning: in-sample",
            "token pruning: held-out", "blind: held-out", "Spearman: in-sample", "Spearman: held-out"]
    for space, t in tables.items():
        first = next(iter(t["verification"].values()))
        ins, out = first["in_sample"], first["held_out"]
        L.append(f"Space `{space}`: first-token KL (nats), mean over the {ins['samples']} searched samples "
                 f"(in-sample) and over held-out samples ({t.get('verify_data')}); Spearman of proxy vs "
                 f"truth over {ins['random']} random feasible policies at the same budget.")
        L += ["", "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
        for spec, v in t["verification"].items():
            ins, out = v["in_sample"], v["held_out"] or {}
            tp_in, tp_out = ins.get("token_pruning") or {}, out.get("token_pruning") or {}
            cells = [spec, _kl(v["predicted"]), _kl(ins["chosen_true"]), _kl(out.get("chosen_true")),
                     _kl(tp_in.get("true")), _kl(tp_out.get("true")), _kl(out.get("blind_true")),
                     _rho(ins.get("spearman")), _rho(out.get("spearman"))]
            L.append("| " + " | ".join(cells) + " |")
        L.append("")
    return L


def compared_section(results: dict[str, Any]) -> list[str]:
    """The compared methods' policies (docs/methods.md) by their true first-token KL on the
    searched samples and on held-out ones, as the DOP searches' are shown above."""
    compared = results.get("compared") or {}
    if not compared:
        return []
    L = ["## Compared methods: divergence in-sample and held-out", "",
         "First-token KL (nats) of each method's policy, mean over the searched samples (in-sample) and over "
         "the held-out ones; the method's own search cost; a budget it cannot meet is not evaluated.", "",
         "| method | budget | in-sample | held-out | decoder FLOPs (the budget's convention) | note |", "|---|---|---|---|---|---|"]
    for method, r in compared.items():
        for spec, e in r["budgets"].items():
            L.append(f"| {r.get('label', method)} | {spec} | {_kl(e['in_sample'])} | {_kl(e.get('held_out'))} | "
                     f"{_pct(e['flops_fraction'])}% | {e.get('note') or ''} |")
    L.append("")
    L += [f"- {r.get('label', m)}: {r['summary']}" for m, r in compared.items()]
    L.append("")
    return L


def _rho(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def write_models_report(results: dict[str, Any], path) -> None:
    """report.md of `dop run --model A,B`: the models side by side (Rel. Avg. and FLOPs per
    budget and method, the held-out divergences), with links to each model's own report."""
    models, dirs = results["models"], results["dirs"]
    L = [f"# dop run report: {len(models)} models side by side", ""]
    L.append("Each model ran the whole job with the same options; its own report (every task, both FLOPs "
             "conventions, the policies and plots) is linked below. Rel. Avg. (95% bootstrap interval) is "
             "against each model's own unpruned accuracy; FLOPs reduction is of the decoder, dop convention.")
    L.append("")
    L += [f"- `{m}`: [report]({dirs[m]}/report.md), unpruned average {_pct(r['unpruned']['average'])}%, "
          f"{r['num_test_samples']} test samples" for m, r in models.items()]
    L.append("")
    specs = list(dict.fromkeys(b["spec"] for r in models.values() for b in r["budgets"]))
    for spec in specs:
        L.extend(_models_budget_table(models, spec))
    for m, r in models.items():
        section = verification_section(r)[2:] + certified_section(r)[2:] + compared_section(r)[2:]  # without headings
        if section:
            L += [f"## `{m}`: divergences", "", *section]
    L += ["## Pareto plots", ""] + [f"![{m}]({dirs[m]}/pareto.png)" for m in models] + [""]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(L))


def _models_budget_table(models: dict[str, dict], spec: str) -> list[str]:
    """One budget: a row per method, a FLOPs reduction and a Rel. Avg. column per model."""
    budgets = {m: next((b for b in r["budgets"] if b["spec"] == spec), None) for m, r in models.items()}
    label = next(b["label"] for b in budgets.values() if b)
    rows = {m: {x["method"]: x for x in b["methods"]} if b else {} for m, b in budgets.items()}
    methods = list(dict.fromkeys(name for r in rows.values() for name in r))
    head = ["method"] + [f"{m}: {col}" for m in models for col in ("reduction", "Rel. Avg. (95% CI)")]
    L = [f"## Budget: {label}", "", "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for name in methods:
        cells = [name]
        for m in models:
            x = rows[m].get(name)
            ff = None if x is None else x.get("flops_fraction")
            cells += ["-" if ff is None else f"{100 * (1 - ff):.1f}%",
                      "-" if x is None else _ci(x.get("rel_avg"), (x.get("ci") or {}).get("rel_avg"))]
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    return L
