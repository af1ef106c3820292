"""report.md's section on the certified choice (docs/design.md, "Certified choice"): per
search and budget, the candidates by proxy with their true divergence on the search samples
and on held-out ones, which was chosen, and the outlier samples."""

from __future__ import annotations

from typing import Any, Sequence


def name_outliers(found: Sequence[dict], shown: int = 5) -> str:
    """``found`` (:func:`dop.search.robust.outliers`) in words: the first ``shown`` as
    ``id (divergence, ratio x)``, then how many more."""
    named = ", ".join(f"{o['sample']} ({o['divergence']:.3g}, {o['ratio']:.0f}x)" for o in found[:shown])
    return named + (f" and {len(found) - shown} more" if len(found) > shown else "")


def _g(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def certified_section(results: dict[str, Any]) -> list[str]:
    tables = {s: t for s, t in results.get("tables", {}).items() if t.get("certified")}
    if not tables:
        return []
    L = ["## Certified choice", ""]
    for space, t in tables.items():
        first = next(iter(t["certified"].values()))
        L += [f"Space `{space}`: the {len(first['candidates'])} best policies by proxy, their true first-token KL "
              f"({first['aggregate']}) on the {first['samples']} search samples and on held-out samples; the "
              "closest on the search samples is chosen (**bold**).", "",
              "| budget | # | parameters | proxy | true: search samples | true: held-out |", "|---|---|---|---|---|---|"]
        notes = []
        for spec, c in t["certified"].items():
            held = c.get("heldout") or [None] * len(c["candidates"])
            for i, (row, h) in enumerate(zip(c["candidates"], held)):
                params = ", ".join(f"{k}={v}" for k, v in row["params"].items())
                cells = [spec if i == 0 else "", str(i + 1), params, _g(row["proxy"]), _g(row["true"]), _g(h)]
                if i == c["chosen"]:
                    cells = [cells[0]] + [f"**{x}**" for x in cells[1:]]
                L.append("| " + " | ".join(cells) + " |")
            if c.get("spearman_heldout") is not None:
                notes.append(f"- {spec}: Spearman over the candidates, held-out truth vs the search samples' "
                             f"ranking {c['spearman_heldout']:.3f}, vs the proxy "
                             + _g(c.get("spearman_proxy_heldout")))
            held_out = ((t.get("verification") or {}).get(spec) or {}).get("held_out") or {}
            for where, found in (("search samples", c.get("outliers")), ("held-out samples", held_out.get("outliers"))):
                if found:
                    notes.append(f"- {spec}: outliers among the {where} (chosen policy's divergence over 10x its "
                                 f"median): {name_outliers(found)}")
        L += ["", *notes, ""] if notes else [""]
    return L
