"""Issue 16: every bad input gets one clear line (or a correct result) before any work; no
traceback; output files checked, locked and rescued; one budget meaning everywhere."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import pytest
import torch

import dop
from dop.cli import main
from dop.evaluate.datasets import DatasetError, as_sample, load_jsonl, set_max_image_pixels
from dop.policy import Policy, PolicyError
from dop.search.table import DivergenceTable, TableError
from fixtures_eval import build_tiny_llava, write_jsonl_dataset

# a folder no user may create files in, even root (issue 16's "read-only folder" case)
UNWRITABLE = "/proc" if os.path.isdir("/proc/self") else None  # procfs: no user creates files there
needs_unwritable = pytest.mark.skipif(UNWRITABLE is None, reason="no unwritable folder on this system")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hard")
    model = build_tiny_llava(root / "tiny")
    rows = [{"question": "what color is the circle ?", "answers": ["red"], "colour": (40 * i, 90, 200 - 30 * i)}
            for i in range(3)]
    data = write_jsonl_dataset(root / "data", rows)
    return root, str(model), str(data)


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: the error must come before the work."""
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the bad input was refused")

    import dop.evaluate.loading as loading

    monkeypatch.setattr(loading, "load_model", boom)
    import dop.demo

    monkeypatch.setattr(dop.demo, "load_demo", boom)


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("dop: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------- outputs checked before work
@needs_unwritable
@pytest.mark.parametrize("argv", [
    ["search", "--model", "MODEL", "--data", "DATA", "--budget", "0.9", "-o", f"{UNWRITABLE}/p.json"],
    ["search", "--model", "MODEL", "--data", "DATA", "--budget", "0.9", "-o", "OK", "--json", f"{UNWRITABLE}/s.json"],
    ["search", "--model", "MODEL", "--data", "DATA", "--budget", "0.9", "-o", "OK", "--table", f"{UNWRITABLE}/t.json"],
    ["eval", "--model", "MODEL", "--data", "DATA", "--json", f"{UNWRITABLE}/e.json"],
    ["baseline", "spatial", "--model", "llava-1.5-7b", "--tokens", "64", "-o", f"{UNWRITABLE}/b.json"],
    ["transfer", "POLICY", "--num-layers", "4", "-o", f"{UNWRITABLE}/t.json"],
    ["data", "export", "shapes", "--n", "2", "--out", f"{UNWRITABLE}/export"],
    ["run", "--model", "MODEL", "--data", "DATA", "--test-data", "DATA", "--out", f"{UNWRITABLE}/run"],
])
def test_unwritable_output_is_refused_before_work(saved, tmp_path, capsys, no_model_load, argv):
    root, model, data = saved
    pol = tmp_path / "p.json"
    Policy(2, [1.0], {"mlp": [1]}).to_json(pol)
    subst = {"MODEL": model, "DATA": data, "OK": str(tmp_path / "ok.json"), "POLICY": str(pol)}
    argv = [subst.get(a, a) for a in argv]
    assert main(argv) == 2
    assert "cannot create files" in _err(capsys)


def test_late_write_failure_keeps_the_result(saved, tmp_path, capsys, monkeypatch):
    """The folder disappears while the search runs: the finished policy is rescued."""
    root, model, data = saved
    folder = tmp_path / "gone"
    folder.mkdir()
    import dop.commands.search as search_mod  # the command's own name for dop.search.search

    real = search_mod.search

    def search_then_remove(*a, **k):
        import shutil

        res = real(*a, **k)
        shutil.rmtree(folder)  # its lock file included
        return res

    monkeypatch.setattr(search_mod, "search", search_then_remove)
    rc = main(["search", "--model", model, "--data", data, "--samples", "2", "--budget", "0.9", "--no-progress",
               "--ranker", "random", "-o", str(folder / "p.json")])
    assert rc == 1
    line = _err(capsys)
    assert "the finished result is saved in" in line
    rescued = line.rsplit("saved in ", 1)[1].strip()
    assert Policy.from_json(rescued).num_layers == 2
    os.unlink(rescued)


# ---------------------------------------------------------------- damaged inputs
def test_truncated_safetensors_is_one_line(saved, tmp_path, capsys):
    import shutil

    root, model, data = saved
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["eval", "--model", str(broken), "--data", data, "--no-progress"]) == 2
    assert "damaged or incomplete" in _err(capsys)


def _png_header(path: Path, w: int, h: int) -> None:
    """A PNG whose header claims ``w`` x ``h`` pixels (the pixel data is never reached)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


def test_huge_image_is_refused_with_the_option_to_raise_the_limit(tmp_path, capsys):
    _png_header(tmp_path / "big.png", 15000, 15000)
    (tmp_path / "data.jsonl").write_text(json.dumps({"image": "big.png", "question": "q?", "answers": ["a1"]}) + "\n")
    with pytest.raises(DatasetError, match=r"15000x15000 = 225000000 pixels, above the limit.*--max-image-pixels"):
        load_jsonl(tmp_path / "data.jsonl")
    try:
        set_max_image_pixels(300_000_000)
        assert len(load_jsonl(tmp_path / "data.jsonl")) == 1  # the header passes under a raised limit
    finally:
        set_max_image_pixels(None)
    assert main(["eval", "--model", "demo", "--data", str(tmp_path), "--no-progress"]) == 2
    assert "above the limit" in _err(capsys)
    assert main(["eval", "--model", "demo", "--data", str(tmp_path), "--max-image-pixels", "0"]) == 2
    assert "--max-image-pixels must be a positive integer" in _err(capsys)


def test_deeply_nested_policy_is_a_policy_error(tmp_path, capsys):
    p = tmp_path / "nested.json"
    p.write_text('{"format": "dop-policy/1", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(PolicyError, match="nested 100001 levels deep"):
        Policy.from_json(p)
    for argv in (["transfer", str(p), "--num-layers", "4"], ["flops", "--model", "demo", "--policy", str(p)]):
        assert main(argv) == 2
        assert "nested" in _err(capsys)


def test_huge_policy_file_is_not_read_whole(tmp_path):
    p = tmp_path / "huge.json"
    with open(p, "wb") as fh:  # sparse: 600 MB on paper, nothing on disk
        fh.write(b"{")
        fh.truncate(600 * 2**20)
    with pytest.raises(PolicyError, match="larger than 1048576 bytes"):
        Policy.from_json(p)


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d["entries"]["n_v"].__setitem__("4", "oops"), r"entries.n_v.4 must be a list of 2"),
    (lambda d: d["entries"]["n_v"].__setitem__("4", [0.1]), r"entries.n_v.4 must be a list of 2"),
    (lambda d: d["entries"]["n_v"].__setitem__("4", [0.1, "x"]), r"entries.n_v.4\[1\] must be a divergence"),
    (lambda d: d["entries"]["n_v"].pop("4"), "do not match the measured grid"),
    (lambda d: d.__setitem__("num_samples", "2"), "'num_samples' must be a positive integer"),
    (lambda d: d.__setitem__("entries", []), "'entries' must be an object"),
    (lambda d: d.__setitem__("layer_evals", None), "'layer_evals' must be a non-negative number"),
])
def test_table_entries_are_type_checked(tmp_path, mutate, match):
    good = {"format": "dop-search-table/1", "key": {"measured": {"n_v": [0, 4]}}, "num_samples": 2,
            "entries": {"n_v": {"0": [0.5, 0.25], "4": [0.0, None]}}}
    DivergenceTable.from_dict(json.loads(json.dumps(good)))
    bad = json.loads(json.dumps(good))
    mutate(bad)
    (tmp_path / "t.json").write_text(json.dumps(bad))
    with pytest.raises(TableError, match=match):
        DivergenceTable.load(str(tmp_path / "t.json"))


@pytest.mark.parametrize("answers", [[""], ["  "], ["yes", ""]])
def test_blank_answers_are_refused(tmp_path, answers):
    folder = write_jsonl_dataset(tmp_path, [{"question": "q?", "answers": answers, "colour": (1, 2, 3)}])
    with pytest.raises(DatasetError, match="blank answer"):
        load_jsonl(folder)
    with pytest.raises(DatasetError, match="blank answer"):
        as_sample({"image": None, "question": "q?", "answers": answers})


# ---------------------------------------------------------------- options checked before work
@pytest.mark.parametrize("extra,match", [
    (["--baselines", "spatial,foo"], "--baselines: unknown method"),
    (["--space", "dop,nope"], "--space: unknown search space"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be a positive integer"),
    (["--budgets", "tokens:0"], "keeps no visual token"),
    (["--budgets", "0.5,0.5"], "given twice"),
    (["--ranker", "nosuch"], "unknown ranker"),
])
def test_run_options_are_checked_before_work(tmp_path, capsys, no_model_load, extra, match):
    assert main(["run", "--out", str(tmp_path / "r"), "--no-progress", *extra]) == 2
    assert match in _err(capsys)


def test_tokens_zero_is_refused_the_same_way_everywhere(saved, tmp_path, capsys):
    root, model, data = saved
    for argv in (["search", "--model", model, "--data", data, "--budget", "tokens:0", "-o", str(tmp_path / "p.json")],
                 ["baseline", "vispruner", "--model", "demo", "--budget-tokens", "0", "-o", str(tmp_path / "b.json")],
                 ["baseline", "vispruner", "--model", "demo", "--budget", "tokens:0", "-o", str(tmp_path / "b.json")]):
        assert main(argv) == 2
        assert "keeps no visual token" in _err(capsys)


def test_budget_above_the_unpruned_cost_gives_the_unpruned_policy(saved, tmp_path, capsys):
    root, model, data = saved
    out = tmp_path / "p.json"
    assert main(["search", "--model", model, "--data", data, "--samples", "2", "--budget", "99T", "--no-progress",
                 "--ranker", "random", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "nothing is pruned" in text and "predicted divergence (proxy): 0" in text
    pol = Policy.from_json(out)
    assert pol.is_unpruned() and "nothing is pruned" in pol.meta["note"]


def test_blind_policy_is_described_without_depths():
    from dop.search.spaces import DopSpace

    sp = DopSpace(8, 144)
    text = sp.describe({"n_v": 0, "D_attn": 8, "D_mlp": 6})
    assert "D_attn=" not in text and "no visual token kept" in text


def test_budget_means_the_same_in_search_and_baseline(capsys, tmp_path):
    """--budget 0.5 is a fraction of the dop-convention decoder FLOPs in both commands."""
    from dop import count_flops
    from dop.search.cost import parse_budget

    out = tmp_path / "b.json"
    assert main(["baseline", "cdpruner", "--model", "demo", "--budget", "0.5", "-o", str(out)]) == 0
    assert "(dop convention)" in capsys.readouterr().out
    pol = Policy.from_json(out)
    assert pol.meta["budget_convention"] == "dop" and parse_budget("0.5").convention("dop") == "dop"
    n = pol.meta["visual_tokens"]
    rep = count_flops("demo", pol, num_visual_tokens=n, num_text_tokens=64)
    assert rep.decoder / rep.decoder_unpruned <= 0.5
    one_more = dop.baselines.token_policy(8, n, pol.meta["kept_tokens"] + 1)
    rep = count_flops("demo", one_more, num_visual_tokens=n, num_text_tokens=64)
    assert rep.decoder / rep.decoder_unpruned > 0.5  # tight in the dop convention
    # tokens:N is the paper convention in both, and --budget-tokens N is the same budget
    assert main(["baseline", "cdpruner", "--model", "demo", "--budget-tokens", "32", "-o", str(out)]) == 0
    a = Policy.from_json(out).meta
    assert main(["baseline", "cdpruner", "--model", "demo", "--budget", "tokens:32", "-o", str(out)]) == 0
    b = Policy.from_json(out).meta
    assert a["budget_convention"] == b["budget_convention"] == "paper" and a["kept_tokens"] == b["kept_tokens"] == 32


def test_flops_accepts_demo(capsys):
    assert main(["flops", "--model", "demo"]) == 0
    assert "decoder TFLOPs" in capsys.readouterr().out


# ---------------------------------------------------------------- concurrency and modes
def test_second_writer_of_the_same_output_is_refused(tmp_path, capsys):
    from dop.outputs import output_lock

    out = tmp_path / "b.json"
    with output_lock([out]):  # another writer holds it (a second flock conflicts even in-process)
        assert main(["baseline", "spatial", "--model", "demo", "--tokens", "8", "-o", str(out)]) == 1
        assert "another dop process" in _err(capsys) and not out.exists()
    assert main(["baseline", "spatial", "--model", "demo", "--tokens", "8", "-o", str(out)]) == 0
    assert not (tmp_path / ".b.json.lock").exists()


def test_lock_is_released_when_its_holder_is_killed(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from dop.outputs import output_lock

    out = tmp_path / "p.json"
    src = os.path.join(os.path.dirname(dop.__file__), os.pardir)
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from dop.outputs import output_lock\n"
            "with output_lock([sys.argv[2]]):\n    print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, src, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(dop.outputs.OutputLockedError, match=f"process {proc.pid}"):
            with output_lock([out]):
                pass
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.time() + 5
        with output_lock([out]):  # the kernel dropped the dead holder's lock: no stale lock
            assert time.time() < deadline
    finally:
        if proc.poll() is None:
            proc.kill()


def test_outputs_follow_the_umask(tmp_path):
    from dop.jsonio import write_json_atomic
    from dop.report.stages import Stages

    old = os.umask(0o027)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        Stages(tmp_path, log=lambda _: None).run("s", lambda: 1, key=1)
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "stages" / "s.json").stat().st_mode & 0o777 == 0o640


# ---------------------------------------------------------------- the CLI's error lines
def test_unexpected_errors_are_one_line_with_exit_1(monkeypatch, capsys):
    import dop.commands.flops as flops_cmd

    def broken(args):
        raise TypeError("boom\nsecond line")

    monkeypatch.setattr(flops_cmd, "run", broken)
    assert main(["flops", "--model", "demo"]) == 1
    line = _err(capsys)
    assert "internal error (TypeError: boom second line)" in line and "DOP_DEBUG=1" in line


# ---------------------------------------------------------------- run progress
def test_stage_progress_says_k_of_n_and_time_left(tmp_path):
    from dop.report.stages import Stages

    logged = []
    st = Stages(tmp_path, log=logged.append, total=3)
    st.run("a", lambda: 1, key=1)
    st.run("b", lambda: 2, key=2)
    progress = [m for m in logged if m.startswith("[progress]")]
    assert progress[0].startswith("[progress] stage 1 of 3 (a) done") and "left" in progress[0]
    assert progress[1].startswith("[progress] stage 2 of 3 (b) done")


def test_no_progress_hides_the_weight_loading_bar(monkeypatch):
    from transformers.utils import logging as hf_logging

    from dop import pipeline
    from dop.pipeline import job as pipeline_job

    seen = []

    def fake_load(name, attn_implementation="sdpa"):
        seen.append(hf_logging.is_progress_bar_enabled())
        return "model", "processor"

    hf_logging.enable_progress_bar()
    pipeline_job.load_model(pipeline.RunOptions(progress=False), fake_load)
    pipeline_job.load_model(pipeline.RunOptions(progress=True), fake_load)
    assert seen == [False, True] and hf_logging.is_progress_bar_enabled()


def test_demo_model_gets_the_demo_prompt():
    from dop.demo import build_prompt as demo_prompt
    from dop.evaluate.loading import chat_prompt, load_model, prompt_builder_for_model

    model, _ = load_model("demo")
    assert prompt_builder_for_model(model) is demo_prompt
    model.config._name_or_path = "llava-hf/llava-1.5-7b-hf"
    assert prompt_builder_for_model(model) is chat_prompt


def test_run_failing_late_says_what_is_kept(saved, tmp_path, capsys, monkeypatch):
    root, model, data = saved
    import dop.report.markdown as md

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(md, "write_report", disk_full)
    out = tmp_path / "run"
    argv = ["run", "--model", model, "--data", data, "--test-data", data, "--samples", "2", "--test-samples", "2",
            "--budgets", "tokens:1/3", "--space", "dop", "--baselines", "none", "--ranker", "spatial",
            "--no-progress", "--out", str(out)]
    assert main(argv) == 1
    line = _err(capsys)
    assert "No space left on device" in line and f"the finished stages are kept in {out}/stages" in line
    assert (out / "stages" / "search-dop.json").is_file() and (out / "stages" / "eval-unpruned.json").is_file()
