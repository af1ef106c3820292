"""Killed work resumes to identical results (issue 16): a `dop search` killed with SIGKILL in
the middle of its divergence table, and a `dop run` killed between two stages, rerun with the
same command and give what an uninterrupted run gives. The kill is deterministic: the child
process sends SIGKILL to itself after a set number of table entries (or stages)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from dop.cli import main
from dop.policy import Policy
from dop.search.table import DivergenceTable
from fixtures_eval import build_tiny_llava, write_jsonl_dataset

SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "src"))
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# runs `dop` in a child that kills itself (SIGKILL, no clean-up) at the N-th table entry or stage
CHILD = r"""
import os, signal, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import torch; torch.set_num_threads(1)
what, n = sys.argv[3], int(sys.argv[4])
if what == "entries":
    import dop.search.table as T
    real = T.build_table
    def build_table(*a, **k):
        k["checkpoint_s"] = 0.0  # save after every entry, so the kill leaves a partial table
        k["on_entry"] = lambda done: done >= n and os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    T.build_table = build_table
    import dop.search.api as A
    A.build_table = build_table
else:
    import dop.report.stages as S
    real = S.Stages.run
    count = [0]
    def run(self, *a, **k):
        out = real(self, *a, **k)
        count[0] += 1
        if count[0] >= n:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    S.Stages.run = run
from dop.cli import main
sys.exit(main(sys.argv[5:]))
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = build_tiny_llava(root / "tiny")
    rows = [{"question": "what color is the circle ?", "answers": ["red"], "colour": (50 * i, 90, 200 - 40 * i)}
            for i in range(3)]
    return root, str(model), str(write_jsonl_dataset(root / "data", rows))


def _killed(kind: str, n: int, argv: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-c", CHILD, SRC, TESTS, kind, str(n), *argv],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def test_killed_search_resumes_to_identical_results(saved, tmp_path, capsys):
    root, model, data = saved
    base = ["search", "--model", model, "--data", data, "--samples", "3", "--budgets", "0.9,tokens:8",
            "--ranker", "random", "--no-progress", "--threads", "1", "--seed", "1"]
    # uninterrupted
    assert main(base + ["-o", str(tmp_path / "a.json"), "--table", str(tmp_path / "ta.json")]) == 0
    # killed after 7 entries, then the same command again
    killed = base + ["-o", str(tmp_path / "b.json"), "--table", str(tmp_path / "tb.json")]
    _killed("entries", 7, killed)
    partial = DivergenceTable.load(str(tmp_path / "tb.json"))
    assert 0 < partial.total() - partial.missing() < partial.total()  # really killed half-way
    assert not (tmp_path / "b.0.9.json").exists()
    assert main(killed) == 0
    for budget in ("0.9", "tokens-8"):
        a = Policy.from_json(tmp_path / f"a.{budget}.json")
        b = Policy.from_json(tmp_path / f"b.{budget}.json")
        assert (a.groups, a.depth, a.meta["predicted_divergence"]) == (b.groups, b.depth, b.meta["predicted_divergence"])
    assert DivergenceTable.load(str(tmp_path / "ta.json")).entries == DivergenceTable.load(str(tmp_path / "tb.json")).entries


def test_killed_run_resumes_to_identical_results(saved, tmp_path):
    root, model, data = saved
    base = ["run", "--model", model, "--data", data, "--test-data", data, "--samples", "2", "--test-samples", "3",
            "--budgets", "tokens:1/3", "--space", "dop", "--baselines", "spatial", "--ranker", "spatial",
            "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    killed = base + ["--out", str(tmp_path / "b")]
    _killed("stages", 2, killed)  # DOP's search and GSOP's (the first compared method) done, then SIGKILL
    assert sorted(p.name for p in (tmp_path / "b" / "stages").iterdir()) == ["search-dop.json", "search-gsop.json"]
    assert main(killed) == 0
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert set(b["reused"]) == {"search-dop", "search-gsop"}

    def figures(res):
        return [[(m["method"], m["tasks"], m["rel_avg"], m["flops_dop"], m["ci"]) for m in bb["methods"]]
                for bb in res["budgets"]]

    assert figures(a) == figures(b)
