"""The lmms-eval model `dop` and the shapes_test task folder, run through the real lmms-eval
CLI, offline, on the bundled demo model: per-task accuracies and FLOPs must equal `dop eval`
on the same samples with the same prompt, unpruned, under a DOP policy, and with two
processes. Skipped when lmms-eval is not installed (the lmms extra; .ci/run installs it
when DOP_CI_LMMS=1)."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("lmms_eval") is None or importlib.util.find_spec("datasets") is None,
    reason="lmms-eval is not installed (pip install torch==2.13.0 -e '.[lmms]'; see docs/eval.md)",
)

TASKS = ("exist", "color", "count", "position", "read")
N = 60  # samples exported: 12 per task; --limit 60 takes them all
# a policy of the demo's 8 layers, as `dop search --model demo --data shapes:val --samples 4
# --budget tokens:32` chose it: the top 43 of 144 visual tokens run every op, the rest none
POLICY = {"format": "dop-policy/1", "num_layers": 8, "groups": [43 / 144, 1.0],
          "depth": {"attn": [8, 0], "mlp": [5, 0]}, "ranker": "vispruner"}


def _env(tmp: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               HF_DATASETS_CACHE=str(tmp / "hf_cache"), TOKENIZERS_PARALLELISM="false")
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    from dop.cli import main

    out = tmp_path_factory.mktemp("lmms") / "shapes_hf"
    assert main(["data", "export", "shapes", "--format", "hf", "--n", str(N), "--out", str(out)]) == 0
    return out


def _lmms_eval(export: Path, work: Path, model_args: str, launcher=()) -> tuple[dict, list[dict], str]:
    """Run lmms-eval; returns (results by task, per-request FLOPs rows, the log)."""
    work.mkdir(parents=True, exist_ok=True)
    cmd = [*launcher, "-m", "lmms_eval"] if launcher else [sys.executable, "-m", "lmms_eval"]
    cmd += ["--model", "dop", "--model_args", f"{model_args},log_dir={work / 'dop_log'}",
            "--include_path", str(export), "--tasks", "shapes_test", "--limit", str(N),
            "--output_path", str(work / "out")]
    proc = subprocess.run(cmd, cwd=work, env=_env(work), capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    (path,) = glob.glob(str(work / "out" / "*" / "*_results.json"))
    results = json.loads(Path(path).read_text())["results"]
    rows = [json.loads(line) for f in sorted(glob.glob(str(work / "dop_log" / "flops.rank*.jsonl")))
            for line in Path(f).read_text().splitlines()]
    return results, rows, log


def _dop_eval(export: Path, tmp: Path, *extra) -> dict:
    from dop.cli import main

    out = tmp / "dop_eval.json"
    assert main(["eval", "--model", "demo", "--data", str(export / "shapes_test.parquet"), "--limit", str(N),
                 "--no-progress", "--no-baseline", "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def _check_same(results: dict, rows: list[dict], ref: dict) -> None:
    for t in TASKS:
        assert results[f"shapes_test_{t}"]["accuracy,none"] == pytest.approx(ref["tasks"][t]["accuracy"], abs=1e-12), t
    assert results["shapes_test"]["accuracy,none"] == pytest.approx(ref["average"], abs=1e-12)
    assert len(rows) == N and sorted((r["task"], r["doc_id"]) for r in rows) == sorted(
        (f"shapes_test_{t}", i) for t in TASKS for i in range(N // len(TASKS)))
    for conv in ("dop", "paper"):
        for part in ("decoder", "total"):
            mean = sum(r["flops"][conv][part] for r in rows) / len(rows)
            assert mean == pytest.approx(ref["flops"][conv][part], rel=1e-12), (conv, part)


@pytest.fixture(scope="module")
def unpruned(export, tmp_path_factory):
    work = tmp_path_factory.mktemp("unpruned")
    return _lmms_eval(export, work, "pretrained=demo"), _dop_eval(export, work)


def test_lmms_eval_unpruned_matches_dop_eval(unpruned):
    (results, rows, log), ref = unpruned
    _check_same(results, rows, ref)
    assert "unpruned; per-request FLOPs in" in log
    assert ref["tasks"]["position"]["accuracy"] < 1.0  # a check that a constant could not pass


def test_lmms_eval_under_a_dop_policy_matches_dop_eval(export, tmp_path, unpruned):
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    results, rows, log = _lmms_eval(export, tmp_path / "run", f"pretrained=demo,policy={policy}")
    ref = _dop_eval(export, tmp_path, "--policy", str(policy))
    _check_same(results, rows, ref)
    (_, base_rows, _), base = unpruned
    # the policy prunes: fewer FLOPs than unpruned, in both conventions
    assert ref["flops"]["dop"]["decoder"] < 0.5 * base["flops"]["dop"]["decoder"]
    assert "policy groups" in log and "ranker vispruner" in log


def test_lmms_eval_two_processes_give_the_same_numbers(export, tmp_path, unpruned):
    (one, _, _), ref = unpruned
    launcher = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    results, rows, log = _lmms_eval(export, tmp_path, "pretrained=demo", launcher=launcher)
    _check_same(results, rows, ref)
    files = sorted(Path(p).name for p in glob.glob(str(tmp_path / "dop_log" / "flops.rank*.jsonl")))
    assert files == ["flops.rank0.jsonl", "flops.rank1.jsonl"]  # each process served its share
    assert all(Path(tmp_path / "dop_log" / f).read_text().count("\n") == N // 2 for f in files)
    for t in TASKS:
        assert results[f"shapes_test_{t}"]["accuracy,none"] == one[f"shapes_test_{t}"]["accuracy,none"]


# ------------------------------------------------------------------ the model class in-process
@pytest.fixture(scope="module")
def lmm(tmp_path_factory):
    from dop.lmms.model import DopLMM

    return DopLMM(pretrained="demo", log_dir=str(tmp_path_factory.mktemp("lmm")))


def _doc_instance(lmm, request_type, args_head, doc, task="t", split="test"):
    from lmms_eval.api.instance import Instance

    lmm.task_dict = {task: {split: {0: doc}}}
    return Instance(request_type=request_type, arguments=(*args_head, lambda d: [d["image"]], 0, task, split),
                    idx=0, metadata={"task": task, "doc_id": 0, "repeats": 1})


def test_loglikelihood_is_the_continuations_log_probability(lmm):
    import torch

    from dop.demo import build_prompt
    from dop.evaluate.datasets import load_dataset

    s = load_dataset("shapes:test", limit=2)[1]  # a color question
    doc = {"image": s.load_image()}
    inputs = lmm.processor(images=[doc["image"]], text=[build_prompt(lmm.processor, s.question)], return_tensors="pt")
    with torch.inference_mode():
        logp = torch.log_softmax(lmm.model(**inputs).logits[0, -1].float(), dim=-1)
    ids = {w: lmm.tokenizer.convert_tokens_to_ids(w) for w in ("red", "blue", "green")}
    best = max(ids, key=lambda w: float(logp[ids[w]]))
    got = lmm.loglikelihood([_doc_instance(lmm, "loglikelihood", (s.question, f" {w}"), doc) for w in ids])
    for (value, greedy), w in zip(got, ids):
        assert value == pytest.approx(float(logp[ids[w]]), abs=1e-4)
        assert greedy == (w == best and int(logp.argmax()) == ids[w])


def test_generate_until_honours_stop_strings(lmm):
    from dop.evaluate.datasets import load_dataset

    s = load_dataset("shapes:test", limit=1)[0]
    doc = {"image": s.load_image()}
    (full,) = lmm.generate_until([_doc_instance(lmm, "generate_until", (s.question, {"max_new_tokens": 10}), doc)])
    assert full == "yes"
    (cut,) = lmm.generate_until([_doc_instance(lmm, "generate_until", (s.question, {"until": ["s"]}), doc)])
    assert cut == "ye"


def test_batched_generation_equals_batch_size_one(lmm):
    from loguru import logger

    from dop.evaluate.datasets import load_dataset
    from dop.lmms.model import DopLMM

    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="INFO")
    try:
        assert DopLMM._batch_size("3") == 3
    finally:
        logger.remove(sink)
    assert any("batch_size=3: requests that share generation settings are padded" in x for x in lines)
    samples = load_dataset("shapes:test", limit=4)
    from lmms_eval.api.instance import Instance

    lmm.task_dict = {"t": {"test": dict(enumerate({"image": s.load_image()} for s in samples))}}
    settings = [{}, {}, {"max_new_tokens": 3}, {}]  # two generation settings: two groups in a batch
    reqs = [Instance(request_type="generate_until", arguments=(s.question, g, lambda d: [d["image"]], i, "t", "test"),
                     idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1})
            for i, (s, g) in enumerate(zip(samples, settings))]
    one = lmm.generate_until(reqs)
    lmm.batch_size_per_gpu = 3
    try:
        assert lmm.generate_until(reqs) == one  # batches of 3 then 1, in order
    finally:
        lmm.batch_size_per_gpu = 1
    assert one[0] == "yes" and len(set(one)) > 1


def test_multi_round_and_bad_arguments_are_clear_errors(lmm, tmp_path):
    from dop.lmms.model import DopLMM

    with pytest.raises(NotImplementedError, match="generate_until_multi_round is not supported"):
        lmm.generate_until_multi_round([])
    for kwargs, pattern in (({"polcy": "x"}, r"unknown model argument\(s\) polcy"),
                            ({"budget": "tokens:8"}, r"budget= needs search_data="),
                            ({"ranker": "fastv"}, r"ranker= applies only together with policy="),
                            ({"batch_size": "0"}, r"batch_size must be a positive integer")):
        with pytest.raises(ValueError, match=pattern):
            DopLMM(pretrained="demo", log_dir=str(tmp_path), **kwargs)


def test_budget_searches_once_then_reuses_the_cached_policy(tmp_path):
    from loguru import logger

    from dop.lmms.model import DopLMM
    from dop.policy import Policy

    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="INFO")
    try:
        args = dict(pretrained="demo", budget="tokens:32", search_data="shapes:val", search_samples=2,
                    log_dir=str(tmp_path))
        first = DopLMM(**args)
        (cached,) = tmp_path.glob("policy-*.json")
        assert any(f"searched a policy for budget tokens:32 on shapes:val (2 samples): {cached}" in x for x in lines)
        second = DopLMM(**args)
        assert any(f"using the cached policy {cached}" in x for x in lines)
    finally:
        logger.remove(sink)
    assert first.policy.to_dict() == second.policy.to_dict() == Policy.from_json(str(cached)).to_dict()
    assert first.policy.meta["budget"] == "tokens:32" and first.policy.ranker == "vispruner"
