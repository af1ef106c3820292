"""Figures of the main job: the Pareto front and a policy map."""

from __future__ import annotations

from typing import Sequence

from ..policy import OP_KINDS, Policy

KIND_LABELS = {"attn_q": "attention (query)", "attn_kv": "attention (key/value)", "mlp": "MLP"}


def _pyplot():
    import matplotlib  # heavy: matplotlib, only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: matplotlib, only when a figure is drawn

    return plt


def pareto_plot(points: Sequence[dict], path, *, title: str = "", budgets: Sequence[tuple[str, float]] = ()) -> None:
    """Rel. Avg. against decoder FLOPs, one line per method, with error bars.

    ``points``: dicts with ``method``, ``flops_fraction`` (decoder FLOPs over the unpruned
    model's, dop convention), ``rel_avg`` and optionally ``rel_avg_ci`` (``[low, high]``, a
    bootstrap interval; fractions, all plotted in percent). ``budgets``: ``(label, fraction
    of the unpruned decoder FLOPs in the dop convention)``, drawn as dotted vertical lines so
    budgets named in tokens sit on the same axis as the points."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.6), dpi=130)
    methods = []
    for p in points:
        if p["method"] not in methods:
            methods.append(p["method"])
    markers = "osD^v<>ph*"
    drawn = 0
    for label, frac in budgets:
        ax.axvline(100.0 * frac, color="grey", lw=0.7, ls=":", zorder=0)
        ax.annotate(label, (100.0 * frac, 0.0), xycoords=("data", "axes fraction"), rotation=90, fontsize=6.5,
                    color="grey", xytext=(2, 4), textcoords="offset points", va="bottom")
    for i, m in enumerate(methods):
        pts = sorted((100.0 * p["flops_fraction"], 100.0 * p["rel_avg"], p.get("rel_avg_ci"))
                     for p in points if p["method"] == m and p["rel_avg"] is not None)
        if not pts:
            continue
        xs, ys, cis = zip(*pts)
        lo = [y - 100.0 * c[0] if c else 0.0 for y, c in zip(ys, cis)]
        hi = [100.0 * c[1] - y if c else 0.0 for y, c in zip(ys, cis)]
        style = dict(lw=2.4, zorder=3) if m.startswith("DOP") else dict(lw=1.4, alpha=0.85)
        ax.errorbar(xs, ys, yerr=[lo, hi], marker=markers[i % len(markers)], label=m, capsize=2.5,
                    elinewidth=0.9, **style)
        drawn += 1
    ax.axhline(100.0, color="grey", lw=0.8, ls="--", zorder=1)
    ax.annotate("unpruned = 100%", (0.0, 100.0), xycoords=("axes fraction", "data"), textcoords="offset points",
                xytext=(4, -11), fontsize=8, color="grey")
    ax.set_xlabel("decoder prefill FLOPs (% of the unpruned model, dop convention)")
    ax.set_ylabel("Rel. Avg. (% of unpruned accuracy, 95% bootstrap interval)")
    ax.set_title(title or "Accuracy kept vs decoder FLOPs")
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(fontsize=8, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no Rel. Avg. to plot\n(the unpruned model scores 0 on this data)",
                transform=ax.transAxes, ha="center", va="center", color="grey")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def skip_cells(policy: Policy) -> list[tuple[int, int]]:
    """(row of ``OP_KINDS``, layer) of every cell of the policy map where a per-layer skip takes
    some group out below its depth (docs/design.md, "Per-layer skips"): the map's holes."""
    return [(r, l) for r, k in enumerate(OP_KINDS) for l in range(policy.num_layers)
            if any(l in skipped for skipped in policy.kind_skip(k))]


def policy_map(policy: Policy, num_visual_tokens: int, path, *, title: str = "") -> None:
    """Layers (x) by op kind (rows): how many of an image's visual tokens each module processes;
    cells where a per-layer skip makes a hole are hatched and outlined in red."""
    import numpy as np  # heavy: numpy, only when a policy map is drawn

    plt = _pyplot()
    L = policy.num_layers
    data = np.array([[policy.tokens_processed(k, l, num_visual_tokens) for l in range(L)] for k in OP_KINDS])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * L + 2.5), 2.9), dpi=130)
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=num_visual_tokens, interpolation="nearest")
    ax.set_yticks(range(len(OP_KINDS)), [KIND_LABELS[k] for k in OP_KINDS])
    step = 1 if L <= 16 else 2 if L <= 32 else 4
    ax.set_xticks(range(0, L, step), [str(l) for l in range(0, L, step)])
    ax.set_xlabel("decoder layer")
    for r in range(data.shape[0]):
        for c in range(L):
            if L <= 32:
                v = int(data[r, c])
                ax.text(c, r, str(v), ha="center", va="center", fontsize=6.5,
                        color="white" if v < 0.6 * num_visual_tokens else "black")
    holes = skip_cells(policy)
    for r, c in holes:
        ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, hatch="///", edgecolor="red", lw=1.0))
    cb = fig.colorbar(im, ax=ax, pad=0.01)
    cb.set_label(f"visual tokens processed (of {num_visual_tokens})", fontsize=8)
    ax.set_title((title or "Policy map") + (" (hatched: per-layer skips)" if holes else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def divergence_curves(curves: dict[str, Sequence[tuple[float, float]]], path, *, title: str = "") -> None:
    """One line per search parameter: mean KL against the parameter's value."""
    plt = _pyplot()
    n = len(curves)
    cols = min(3, max(1, n))
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.0 * rows), dpi=120, squeeze=False)
    for ax, (name, pts) in zip(axes.flat, curves.items()):
        pts = sorted(pts)
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker=".", lw=1.5)
        ax.set_title(name, fontsize=9)
        is_count = name.lower().startswith(("n_v", "nv"))
        ax.set_xlabel("visual tokens kept" if is_count else "depth (layers that keep doing the op)", fontsize=8)
        ax.set_ylabel("mean first-token KL", fontsize=8)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title or "Divergence table (one parameter changed at a time)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
