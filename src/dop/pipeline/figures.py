"""The main job's figures: the Pareto plot, the divergence curves of each space, a map of
every searched policy beside its file, and the headline map."""

from __future__ import annotations

from ..policy import Policy
from ..report.plots import divergence_curves, pareto_plot, policy_map
from .job import Job


def draw_figures(job: Job, results: dict) -> None:
    """The Pareto plot, the divergence curves, a map per chosen DOP policy beside its file,
    and the headline map: the first space's policy at the middle budget."""
    out, n_visual, budgets = job.out, job.n_visual, results["budgets"]
    points = [dict(method=m["method"], flops_fraction=m["flops_fraction"], rel_avg=m["rel_avg"],
                   rel_avg_ci=(m.get("ci") or {}).get("rel_avg"))
              for b in budgets for m in b["methods"]]
    pareto_plot(points, out / "pareto.png",
                title=f"{job.opts.model}: Rel. Avg. vs decoder FLOPs ({len(job.test)} test samples)",
                budgets=[(b["label"], b["dop_fraction"]) for b in budgets])
    for space, r in job.spaces.items():
        curves = {name: [(int(v), kl) for v, kl in pts.items()] for name, pts in r["curves"].items()}
        if curves:
            divergence_curves(curves, out / f"divergence_{space}.png", title=f"Divergence table, space {space}")
            results["tables"][space]["plot"] = f"divergence_{space}.png"
    for b in budgets:
        for m in b["methods"]:
            if m["kind"] in ("dop", "method"):
                m["policy_map"] = m["policy_file"].replace(".json", ".png")
                policy_map(Policy.from_json(out / m["policy_file"]), n_visual, out / m["policy_map"],
                           title=map_title(m, b, n_visual))
    if budgets and job.opts.spaces:
        b = budgets[len(budgets) // 2]
        m = next((m for m in b["methods"] if m["method"] == f"DOP ({job.opts.spaces[0]})"), None)
        if m is not None:
            title = map_title(m, b, n_visual)
            policy_map(Policy.from_json(out / m["policy_file"]), n_visual, out / "policy_map.png", title=title)
            results["policy_map"] = dict(file="policy_map.png", title=title)



def map_title(m: dict, b: dict, n_visual: int) -> str:
    """The policy map's title says what its cells show: the tokens the chosen policy processes
    at layer 0, beside the budget (a cost: the FLOPs of keeping N tokens, not N kept)."""

    keep = Policy.from_dict(m["policy"]).n_keep(n_visual)
    return f"{m['method']}, budget {budget_words(b)}: processes {keep} of {n_visual} visual tokens at layer 0"



def budget_words(b: dict) -> str:
    if b.get("tokens") is not None:
        return f"the FLOPs of keeping {b['tokens']} tokens"
    return f"{100 * b['fraction']:.1f}% of the decoder FLOPs ({b['convention']} convention)"
