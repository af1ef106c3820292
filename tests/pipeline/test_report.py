"""The report a reader can trust (issue 16): bootstrap intervals and paired comparisons,
timing flagged when it cannot be trusted, policy-map titles that match their cells."""

from __future__ import annotations

import numpy as np
import pytest

from dop.evaluate.bootstrap import Bootstrap
from dop.policy import Policy


def _samples(scores: dict[str, list[float]]) -> list[dict]:
    out, i = [], 0
    for task, ss in scores.items():
        for s in ss:
            out.append({"index": i, "task": task, "score": s})
            i += 1
    return out


UNPRUNED = {"a": [1.0] * 36 + [0.0] * 4, "b": [1.0] * 30 + [0.0] * 10}


def test_intervals_contain_the_estimate_and_shrink_with_samples():
    boot = Bootstrap.from_unpruned(_samples(UNPRUNED), seed=0)
    pruned = {"a": [1.0] * 30 + [0.0] * 10, "b": [1.0] * 27 + [0.0] * 13}
    ci = boot.method(_samples(pruned))
    rel = (30 / 36 + 27 / 30) / 2
    lo, hi = ci["rel_avg"]
    assert lo < rel < hi and 0.05 < hi - lo < 0.4
    assert ci["tasks"]["a"][0] < 0.75 < ci["tasks"]["a"][1]
    assert boot.method(_samples(UNPRUNED))["rel_avg"] == [1.0, 1.0]  # the reference against itself
    big = Bootstrap.from_unpruned(_samples({t: v * 10 for t, v in UNPRUNED.items()}), seed=0)
    lo10, hi10 = big.method(_samples({t: v * 10 for t, v in pruned.items()}))["rel_avg"]
    assert hi10 - lo10 < (hi - lo) / 2  # 10x the samples: about 1/sqrt(10) the width


def test_paired_difference_says_when_it_is_beyond_the_noise():
    boot = Bootstrap.from_unpruned(_samples(UNPRUNED), seed=0)
    same = _samples({"a": [1.0] * 30 + [0.0] * 10, "b": [1.0] * 25 + [0.0] * 15})
    d = boot.difference(same, same)
    assert d["interval"] == [0.0, 0.0] and not d["beyond_noise"]
    # one method right on 6 more samples of each task, on the same samples: paired, beyond the noise
    better = _samples({"a": [1.0] * 36 + [0.0] * 4, "b": [1.0] * 31 + [0.0] * 9})
    d = boot.difference(better, same)
    assert d["interval"][0] > 0 and d["beyond_noise"]
    # a difference of one sample is not
    one = _samples({"a": [1.0] * 31 + [0.0] * 9, "b": [1.0] * 25 + [0.0] * 15})
    assert not boot.difference(one, same)["beyond_noise"]


def test_bootstrap_refuses_samples_of_another_run():
    boot = Bootstrap.from_unpruned(_samples(UNPRUNED), seed=0)
    with pytest.raises(ValueError, match="not in the unpruned run"):
        boot.method(_samples({"a": [1.0] * 40, "c": [1.0] * 40}))


def test_policy_map_title_matches_its_cells(tmp_path):
    """Issue 16: the title said 32 tokens (the budget) over cells showing 43 (the policy)."""
    from dop.pipeline.figures import map_title as _map_title

    pol = Policy.dop(8, 43 / 144, 5, 3)
    m = {"method": "DOP (dop)", "policy": pol.to_dict()}
    b = {"spec": "tokens:2/9", "tokens": 32, "fraction": 0.2, "convention": "paper"}
    title = _map_title(m, b, 144)
    cells_at_layer0 = max(pol.tokens_processed(k, 0, 144) for k in ("attn_q", "attn_kv", "mlp"))
    assert cells_at_layer0 == 43
    assert f"processes {cells_at_layer0} of 144 visual tokens at layer 0" in title
    assert "the FLOPs of keeping 32 tokens" in title


def test_timing_is_flagged_when_the_machine_is_busy_or_times_spread(monkeypatch):
    from dop.pipeline import timing as pipeline
    from dop.report.markdown import method_table, timing_note

    rows = [{"method": "unpruned", "prefill_cv": 0.05, "prefill_ms": 10.0},
            {"method": "DOP (dop)", "prefill_cv": 0.9, "prefill_ms": 90.0}]
    monkeypatch.setattr(pipeline.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(pipeline, "load_average", lambda: 0.5)
    t = pipeline.timing_note(rows, 0.4)
    assert not t["busy"] and t["noisy"] == ["DOP (dop)"] and not t["trusted"]
    table = "\n".join(method_table([dict(r, tasks={}, average=0.5, rel_avg=1.0) for r in rows], [], t))
    assert "prefill ms (unreliable, see note)" in table and "| 90.0 * |" in table and "| 10.0 |" in table
    assert "per-sample times spread" in timing_note(t)
    monkeypatch.setattr(pipeline, "load_average", lambda: 7.5)
    t = pipeline.timing_note([dict(r, prefill_cv=0.05) for r in rows], 6.0)
    assert t["busy"] and "machine was busy (load average 6.0, 7.5 on 2 CPUs)" in timing_note(t)
    monkeypatch.setattr(pipeline, "load_average", lambda: 0.5)
    t = pipeline.timing_note([dict(r, prefill_cv=0.05) for r in rows], 0.2)
    assert t["trusted"] and timing_note(t) is None
    assert "| prefill ms |" in "\n".join(method_table([dict(rows[0], tasks={}, average=0.5, rel_avg=1.0)], [], t))


def test_pareto_plot_draws_error_bars_and_budget_lines(tmp_path):
    from dop.report.plots import pareto_plot

    pts = [dict(method="DOP (dop)", flops_fraction=0.2, rel_avg=0.97, rel_avg_ci=[0.95, 0.99]),
           dict(method="spatial", flops_fraction=0.2, rel_avg=0.6, rel_avg_ci=None)]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = {}
    real_savefig = plt.Figure.savefig

    def capture(fig, path, *a, **k):
        ax = fig.axes[0]
        drawn["xlabel"] = ax.get_xlabel()
        drawn["ylabel"] = ax.get_ylabel()
        drawn["vlines"] = [l.get_xdata()[0] for l in ax.get_lines() if l.get_linestyle() == ":"]
        drawn["bars"] = [np.asarray(c.get_segments()) for c in ax.collections]
        return real_savefig(fig, path, *a, **k)

    plt.Figure.savefig = capture
    try:
        pareto_plot(pts, tmp_path / "p.png", budgets=[("tokens:2/9 (FLOPs of 32 tokens)", 0.286)])
    finally:
        plt.Figure.savefig = real_savefig
    assert (tmp_path / "p.png").is_file()
    assert "dop convention" in drawn["xlabel"] and "bootstrap" in drawn["ylabel"]
    assert drawn["vlines"] == [pytest.approx(28.6)]
    segs = [s for s in drawn["bars"] if len(s)]
    assert any(np.allclose(s[0], [[20.0, 95.0], [20.0, 99.0]]) for s in segs)  # the DOP point's interval


def test_time_left_is_estimated_per_kind_of_stage(tmp_path):
    """A slow search stage must not make every evaluation look as slow (the first estimate
    of a demo run said 47 min left for 4 min of work)."""
    from dop.report.stages import Stages

    st = Stages(tmp_path, log=lambda _: None, total=5)
    st.expected = {"search": 1, "eval": 4}
    st.times = {"search-dop": 100.0, "eval-unpruned": 2.0}
    st._computed = dict(st.times)
    st.done = 1
    assert st.progress("eval-unpruned") == "stage 2 of 5 (eval-unpruned) done; 0 s so far, about 6 s left"
    # before any evaluation was timed, no guess from the (much slower) search stages
    st.times, st._computed, st.done = {"search-dop": 100.0}, {"search-dop": 100.0}, 0
    assert st.progress("search-dop").endswith("; time left known after the first eval stage")
