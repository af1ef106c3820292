"""Search, verification, eval and `dop run` over several processes (issue 14): torchrun with
gloo on this CPU, a tiny saved LLaVA, five samples (shards of 3 and 2). Every figure must
equal one process's; a killed rank resumes from its checkpoint; two "nodes" meet through
the c10d rendezvous on localhost. One thread per process (OMP_NUM_THREADS=1), one per
reference run."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dop
from dop import distributed as dd
from dop.cli import main
from dop.search import DivergenceTable
from fixtures_eval import WORDS, build_tiny_llava, write_jsonl_dataset

HERE = Path(__file__).resolve().parents[1]  # tests/: dist_worker.py and the helpers it imports
WORKER = str(HERE / "dist_worker.py")
SAMPLES = 5
TIMING = {"created", "wall_s", "prefill_ms", "stage_times", "finished", "timing", "prefill_cv", "prefill_noisy"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model = str(build_tiny_llava(root / "tiny"))
    # half the vocabulary as answers, so that one-word answers of the random model score
    # on some samples and not on others
    rows = [{"question": "what color is the circle ?", "answers": WORDS[i % 2::2],
             "colour": (40 * i, 90, 200 - 30 * i)} for i in range(SAMPLES)]
    data = str(write_jsonl_dataset(root / "data", rows))
    return root, model, data


def _search_args(model, data, out: Path) -> list[str]:
    return ["search", "--model", model, "--data", data, "--samples", str(SAMPLES), "--budgets", "0.9,tokens:8",
            "--ranker", "random", "--seed", "3", "--verify", "4", "--no-progress", "--table", str(out / "t.json"),
            "-o", str(out / "p.json"), "--json", str(out / "s.json")]


@pytest.fixture(scope="module")
def one_process(setup):
    """The reference: `dop search` in this process, no process group."""
    root, model, data = setup
    out = root / "one"
    out.mkdir()
    assert main(_search_args(model, data, out) + ["--threads", "1"]) == 0
    return out


def _env(**extra) -> dict:
    src = str(Path(dop.__file__).resolve().parent.parent)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([src, str(HERE)]), **extra)
    env.pop("WORLD_SIZE", None)
    return env


def _torchrun(launch: list[str], program: list[str], log=None, **env) -> subprocess.Popen:
    """torchrun in the background, its output to a pipe, or to the open file ``log`` (for
    launchers run side by side: one whose pipe nobody reads fills it and blocks, and a rank
    blocked on its output stalls the other ranks in their next collective)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, *program]
    return subprocess.Popen(cmd, env=_env(**env), stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_all(procs: list, logs: list[Path], timeout: float = 300) -> list[str]:
    """Wait for launchers started side by side (their output in ``logs``); on a timeout,
    kill them all and fail with what each printed."""
    try:
        for p in procs:
            p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("torchrun launchers timed out:\n" + "\n---\n".join(f.read_text()[-4000:] for f in logs))
    return [f.read_text() for f in logs]


def _run(program: list[str], nproc: int = 2, **env) -> tuple[int, str]:
    p = _torchrun(["--standalone", "--nproc_per_node", str(nproc)], program, **env)
    out, _ = p.communicate(timeout=300)
    return p.returncode, out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _same_table(a: DivergenceTable, b: DivergenceTable) -> None:
    assert a.key == b.key and a.num_samples == b.num_samples  # the key holds the samples' fingerprint
    assert {n: set(v) for n, v in a.entries.items()} == {n: set(v) for n, v in b.entries.items()}
    for name, vals in a.entries.items():
        for v, per in vals.items():
            assert b.entries[name][v] == pytest.approx(per, abs=1e-6), (name, v)


def _untimed(doc):
    if isinstance(doc, dict):
        return {k: _untimed(v) for k, v in doc.items() if k not in TIMING}
    if isinstance(doc, list):
        return [_untimed(v) for v in doc]
    return doc


def _policies(out: Path) -> dict:
    return {p.name.replace("p.", "", 1): json.loads(p.read_text()) for p in sorted(out.glob("p.*.json"))}


# ---------------------------------------------------------------------- helpers in one process
def test_helpers_are_the_identity_in_one_process():
    assert not dd.is_distributed() and dd.rank() == 0 and dd.world_size() == 1 and dd.is_main()
    assert dd.shard(4) == [0, 1, 2, 3]
    assert dd.gather_ordered({1: "b", 0: "a"}, 2) == ["a", "b"]
    assert dd.broadcast({"x": 1}) == {"x": 1} and dd.all_gather(3) == [3]
    with pytest.raises(RuntimeError, match="indices"):
        dd.gather_ordered({0: "a"}, 2)
    assert dd.device_for("cpu") == torch.device("cpu")


# ---------------------------------------------------------------------- search
def test_killed_rank_resumes_from_its_checkpoint(setup, one_process):
    """Rank 1 dies at its 4th table entry; the job (torchrun tears rank 0 down too) is run
    again with the same command, computes only what the checkpoints lack, and ends with one
    process's table (keys, fingerprint, values), policies and verification."""
    root, model, data = setup
    out = root / "killed"
    out.mkdir()
    program = [WORKER, *_search_args(model, data, out)]
    rc, log = _run(program, DOP_TEST_KILL="1:4")
    assert rc != 0 and not (out / "t.json").exists()
    saved = [DivergenceTable.load(str(p)) for p in sorted(out.glob("t.rank*.json"))]
    assert len(saved) == 2
    known = DivergenceTable.load(str(one_process / "t.json"))
    known.entries = {n: {v: [None] * SAMPLES for v in vals} for n, vals in known.entries.items()}
    for t in saved:
        known.merge_values(t)
    assert saved[1].total() - saved[1].missing() == 3  # the entries before the fatal one
    counts = out / "counts"
    counts.mkdir()
    rc, log = _run(program, DOP_TEST_COUNT=str(counts))
    assert rc == 0, log
    computed = [int((counts / f"rank{r}.txt").read_text()) for r in range(2)]
    assert sum(computed) == known.missing()  # nothing computed twice
    ref = DivergenceTable.load(str(one_process / "t.json"))
    per_sample = ref.total() // SAMPLES
    assert computed[1] == 2 * per_sample - 3  # rank 1 holds samples 1 and 3
    _same_table(ref, DivergenceTable.load(str(out / "t.json")))
    assert not list(out.glob("t.rank*.json"))  # the ranks' checkpoints are gone once the table is written
    # the same policies and verification (sharded too) as one process; rank 0 alone prints
    p1, p2 = _policies(one_process), _policies(out)
    assert p1.keys() == p2.keys() == {"0.9.json", "tokens-8.json"} and p1 == p2
    s1, s2 = json.loads((one_process / "s.json").read_text()), json.loads((out / "s.json").read_text())
    assert _untimed(s2["results"]) == _untimed(s1["results"])
    assert len(s2["results"][0]["verification"]["random"]) == 4
    assert log.count("divergence table:") == 1 and log.count("wall time") == 1


# ---------------------------------------------------------------------- eval and run
@pytest.fixture(scope="module")
def eval_one(setup, one_process):
    root, model, data = setup
    out = root / "eval-one.json"
    args = ["eval", "--model", model, "--data", data, "--policy", str(one_process / "p.tokens-8.json"),
            "--max-new-tokens", "1", "--no-progress", "--json"]
    assert main([*args, str(out), "--threads", "1"]) == 0
    doc = json.loads(out.read_text())
    assert 0 < doc["unpruned"]["average"] < 1  # figures worth comparing
    return args, doc


def test_eval_on_two_nodes_through_c10d_equals_one_process(setup, eval_one):
    """Two `torchrun --nnodes 2 --nproc_per_node 1 --rdzv-backend c10d` launchers on
    localhost, as on two machines: the same JSON as one process but for the times, each
    rank having scored its share of the samples (pruned and unpruned passes), progress
    shown for the whole job."""
    root, model, data = setup
    args, ref = eval_one
    out, counts = root / "eval-two.json", root / "eval-counts"
    counts.mkdir()
    port = _free_port()
    files = [root / f"node{node}.log" for node in range(2)]
    with files[0].open("w") as log0, files[1].open("w") as log1:
        procs = [
            _torchrun(["--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-id", "dop-test",
                       "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-conf", f"is_host={int(node == 0)}",
                       "--local-addr", "127.0.0.1"],
                      [WORKER, *(a for a in args if a != "--no-progress"), str(out)], log=log,
                      DOP_TEST_COUNT=str(counts))
            for node, log in enumerate((log0, log1))
        ]
        logs = _wait_all(procs, files)
    assert [p.returncode for p in procs] == [0, 0], logs
    doc = json.loads(out.read_text())
    assert _untimed(doc) == _untimed(ref)
    assert doc["samples"] and doc["unpruned"]["samples"]
    assert sum(log.count("Rel. Avg.") for log in logs) == 1  # the report, printed by rank 0 alone
    # rank 0's progress bars count the whole job's samples (it runs 3 of the 5 itself)
    bars = re.findall(r"(unpruned|pruned):[^\r\n]*?(\d)/5", "".join(logs))
    assert {"pruned", "unpruned"} == {d for d, n in bars if n == "5"}
    scored = sorted(int((counts / f"rank{r}.scored").read_text()) for r in range(2))
    assert scored == [2 * 2, 2 * 3]  # 5 samples as 3 + 2, two passes


def test_run_on_two_processes_equals_one(setup):
    """`torchrun --nproc_per_node 2 -m dop run`: the same divergence table, with every layer
    evaluation done once (the ranks' counts add up to one process's), and the same report
    figures but for the times."""
    root, model, data = setup
    args = ["run", "--model", model, "--data", data, "--test-data", data, "--samples", "3",
            "--test-samples", str(SAMPLES), "--budgets", "tokens:1/3", "--space", "dop", "--baselines", "spatial",
            "--ranker", "spatial", "--no-progress", "--out"]
    assert main([*args, str(root / "run-one")]) == 0
    rc, log = _run(["-m", "dop", *args, str(root / "run-two")])
    assert rc == 0, log
    assert log.count("report:") == 1

    def figures(folder):
        res = json.loads((root / folder / "results.json").read_text())
        for k in ("options", "machine", "reused"):
            res.pop(k)
        for t in [*res["tables"].values(), *res["compared"].values()]:
            t["summary"] = re.sub(r", [0-9.]+ s$", "", t["summary"])  # its wall time
        return _untimed(res)

    assert figures("run-two") == figures("run-one")
    one, two = (DivergenceTable.load(str(root / f / "tables" / "table-dop.json")) for f in ("run-one", "run-two"))
    _same_table(one, two)
    assert (two.layer_evals, two.naive_layer_evals) == (one.layer_evals, one.naive_layer_evals)
    assert not list((root / "run-two" / "tables").glob("*.rank*.json"))
    assert (root / "run-two" / "report.md").is_file()
