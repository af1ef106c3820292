"""`dop eval` end to end on a tiny LLaVA saved with its processor, and every bad-input error.

The checkpoint answers "yes" to everything (``constant_answer``), so the scores of the
data set below can be worked out by hand:

    exist  yes / no / yes           -> accuracy 2/3; precision 2/3, recall 1, F1 0.8
    color  "red"; 3 of 10 say "yes" -> 0 and 0.9 (VQAv2 soft accuracy) -> 0.45
    average (2/3 + 0.45) / 2
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

import dop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: fixtures_eval

from fixtures_eval import NUM_LAYERS, NUM_VISUAL_TOKENS, build_tiny_llava, write_jsonl_dataset  # noqa: E402

from dop.cli import main  # noqa: E402
from dop.evaluate import DatasetError, evaluate, load_dataset, load_model  # noqa: E402
from dop.evaluate import runner as runner_mod  # noqa: E402
from dop.policy import Policy  # noqa: E402

ROWS = [
    {"question": "Is there a red circle?", "answers": ["yes"], "task": "exist"},
    {"question": "Is there a blue square?", "answers": ["no"], "task": "exist"},
    {"question": "Is there a green star?", "answers": ["Yes"], "task": "exist"},
    {"question": "What color is the circle?", "answers": ["red"], "task": "color"},
    {"question": "What color is it?", "answers": ["yes"] * 3 + ["no"] * 7, "task": "color"},
]
EXIST_ACC, COLOR_ACC = 2 / 3, 0.45


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"), constant_answer=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl_dataset(tmp_path_factory.mktemp("data"), ROWS)


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load_model(str(ckpt))


def _policy_file(tmp_path, num_layers=NUM_LAYERS, depth=0, name="policy.json") -> Path:
    p = Policy(num_layers, [0.25, 1.0], {"attn": [num_layers, depth], "mlp": [num_layers, depth]})
    path = tmp_path / name
    p.to_json(path)
    return path


def _eval(*args) -> list[str]:
    return ["eval", *map(str, args), "--no-progress"]


# ------------------------------------------------------------------------ happy paths
def test_load_model_from_saved_folder(loaded):
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    model, processor = loaded
    assert isinstance(model, LlavaForConditionalGeneration) and not model.training
    assert isinstance(processor, LlavaProcessor)
    assert model.dtype == torch.float32


def test_cli_eval_writes_json(ckpt, data, tmp_path, capsys):
    out = tmp_path / "result.json"
    rc = main(_eval("--model", ckpt, "--data", data, "--json", out, "--max-new-tokens", 1))
    printed = capsys.readouterr().out
    assert rc == 0
    for word in ("exist", "color", "average", "decoder FLOPs (dop)", "decoder MACs (paper)", "prefill"):
        assert word in printed
    doc = json.loads(out.read_text())
    assert doc["format"] == "dop-eval/1"
    assert doc["model"] == str(ckpt) and doc["num_samples"] == len(ROWS)
    assert doc["tasks"]["exist"]["accuracy"] == pytest.approx(EXIST_ACC)
    assert doc["tasks"]["exist"]["yes_no"] is True
    assert doc["tasks"]["exist"]["f1"] == pytest.approx(0.8)
    assert doc["tasks"]["exist"]["precision"] == pytest.approx(2 / 3)
    assert doc["tasks"]["color"]["accuracy"] == pytest.approx(COLOR_ACC)
    assert "f1" not in doc["tasks"]["color"]
    assert doc["average"] == pytest.approx((EXIST_ACC + COLOR_ACC) / 2)
    assert doc["policy"] is None and doc["unpruned"] is None and doc["rel_avg"] is None
    assert doc["num_visual_tokens"] == NUM_VISUAL_TOKENS
    for conv in ("dop", "paper"):
        assert doc["flops"][conv]["decoder"] > 0
        assert doc["flops"][conv]["total"] >= doc["flops"][conv]["decoder"]
    assert doc["prefill_ms"] > 0
    assert [s["prediction"] for s in doc["samples"]] == ["yes"] * len(ROWS)
    assert [s["score"] for s in doc["samples"]] == pytest.approx([1, 0, 1, 0, 0.9])
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_cli_eval_with_policy_reports_rel_avg(ckpt, data, tmp_path, capsys):
    out = tmp_path / "pruned.json"
    policy = _policy_file(tmp_path, depth=0)
    threads = torch.get_num_threads()
    rc = main(_eval("--model", ckpt, "--data", data, "--policy", policy, "--ranker", "identity",
                    "--json", out, "--max-new-tokens", 1, "--threads", 2))
    assert torch.get_num_threads() == threads  # restored after an in-process run
    printed = capsys.readouterr().out
    assert rc == 0 and "Rel. Avg." in printed
    doc = json.loads(out.read_text())
    assert doc["policy"]["num_layers"] == NUM_LAYERS and doc["ranker"] == "identity"
    assert doc["environment"]["torch_threads"] == 2
    # the model says "yes" whatever it sees, so pruning cannot change its answers
    assert doc["rel_avg"] == pytest.approx(1.0)
    assert doc["rel_avg_ci"] == [pytest.approx(1.0), pytest.approx(1.0)]  # same answers: no spread
    assert "95% CI" in printed and "100.0-100.0%" in printed
    assert doc["unpruned"]["average"] == pytest.approx(doc["average"])
    assert set(doc["unpruned"]["tasks"]) == {"exist", "color"}
    for conv in ("dop", "paper"):
        assert doc["flops"][conv]["decoder"] < doc["unpruned"]["flops"][conv]["decoder"]


def test_evaluate_api_with_dict_samples_and_given_baseline(loaded):
    from PIL import Image

    model, processor = loaded
    samples = [
        {"image": Image.new("RGB", (48, 40), (9, 9, 9)), "question": "Is it red?", "answers": ["yes"], "task": "exist"},
        {"image": Image.new("L", (30, 30)), "question": "How many?", "answers": ["two"], "task": "count"},
    ]
    base = evaluate(model, processor, samples, max_new_tokens=2, progress=False)
    assert [s.prediction for s in base.samples] == ["yes yes", "yes yes"]
    assert base.tasks["exist"].accuracy == 0.0 and base.average == 0.0
    policy = Policy(NUM_LAYERS, [1.0], {"mlp": [1]})
    pruned = evaluate(model, processor, samples, policy=policy, baseline=base, max_new_tokens=1, progress=False)
    assert pruned.baseline is base
    assert pruned.ranker == "identity"  # the runtime's default when neither policy nor caller names one
    assert pruned.tasks["exist"].accuracy == 1.0
    assert pruned.rel_avg is None  # unpruned accuracy 0 on every task: no ratio
    assert pruned.flops["dop"]["decoder"] < base.flops["dop"]["decoder"]


def test_cli_eval_on_shapes_split(ckpt, capsys):
    rc = main(_eval("--model", ckpt, "--data", "shapes:val:3", "--limit", 5, "--max-new-tokens", 1))
    printed = capsys.readouterr().out
    assert rc == 0
    for task in ("exist", "color", "count", "position", "read"):
        assert task in printed


def test_jsonl_loader_details(tmp_path):
    rows = [dict(r) for r in ROWS[:2]]
    rows[0]["answers"] = [2]  # numbers are accepted as strings
    del rows[1]["task"]  # task defaults to "all"
    path = write_jsonl_dataset(tmp_path, rows)
    path.write_text("\n" + path.read_text() + "\n\n")  # blank lines are skipped
    samples = load_dataset(str(tmp_path))  # a folder holding data.jsonl
    assert [s.task for s in samples] == ["exist", "all"]
    assert samples[0].answers == ["2"] and samples[0].image is None  # lazy
    assert samples[0].load_image().mode == "RGB"
    assert len(load_dataset(str(path), limit=1)) == 1
    assert [s.task for s in load_dataset(str(path), tasks=["all"])] == ["all"]


# ------------------------------------------------------------------------ bad input (item 4)
def _write(tmp_path, text: str, name="data.jsonl") -> Path:
    (tmp_path / "images").mkdir(exist_ok=True)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "ok.png")
    p = tmp_path / name
    p.write_text(text)
    return p


OK_LINE = '{"image": "images/ok.png", "question": "q?", "answers": ["yes"], "task": "exist"}'


@pytest.mark.parametrize(
    "text, message",
    [
        (OK_LINE + "\n" + OK_LINE.replace("ok.png", "gone.png") + "\n",
         r"line 2: image file 'images/gone.png' not found"),
        (OK_LINE + "\n\n" + '{"image": "images/ok.png", "question": "q?"' + "\n",
         r"line 3: not valid JSON"),
        (OK_LINE + "\n" + "[1, 2]\n", r"line 2: expected a JSON object"),
        ('{"image": "images/ok.png", "answers": ["yes"]}\n', r"line 1: missing field 'question'"),
        ('{"image": "images/ok.png", "question": "q", "answers": []}\n', r"line 1: 'answers' must be a non-empty list"),
        ("\n  \n", r"has no samples"),
        ("", r"has no samples"),
    ],
    ids=["missing-image", "malformed-line", "not-object", "missing-field", "empty-answers", "blank", "empty"],
)
def test_bad_jsonl(tmp_path, capsys, ckpt, text, message):
    data = _write(tmp_path, text)
    out = tmp_path / "out.json"
    with pytest.raises(DatasetError, match=message):
        load_dataset(str(data))
    rc = main(_eval("--model", ckpt, "--data", data, "--json", out))
    assert rc == 2
    assert "dop: error:" in capsys.readouterr().err
    assert not out.exists()


def _fail_if_run(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("evaluation started despite bad input")

    monkeypatch.setattr(runner_mod, "_run_pass", boom)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "coco:val"], r"unknown data set 'coco:val'; known data sets: shapes:SPLIT"),
        (["--data", "shapes:nosuch"], r"unknown shapes split 'nosuch'.*train, val, test"),
        (["--data", "shapes:test", "--tasks", "exist,bogus"],
         r"unknown task\(s\) 'bogus' for shapes; known tasks: exist, color, count, position, read"),
        (["--data", "{data}", "--tasks", "bogus"], r"unknown task\(s\) 'bogus' for .*; known tasks: exist, color"),
        (["--data", "{tmp}/missing.jsonl"], r"not found"),
        (["--model", "not-a-model"], r"unknown model 'not-a-model'; expected 'demo'"),
        (["--model", "{tmp}"], r"holds no config.json"),
        (["--model", "{tmp}/gone"], r"model folder '.*gone' not found; expected 'demo'"),
        (["--model", "{gpt2}"], r"unsupported model type 'gpt2'; supported: .*llava"),
        (["--policy", "{policy5}"], r"policy is for 5 decoder layers but the model has 2"),
        (["--policy", "{tmp}/nopolicy.json"], r"no such file"),
        (["--policy", "{policy2}", "--ranker", "bogus"], r"unknown ranker 'bogus'; known rankers: .*identity"),
        (["--ranker", "identity"], r"--ranker applies only together with --policy"),
        (["--json", "{tmp}/no/such/dir/out.json"], r"does not exist"),
        (["--limit", "0"], r"--limit must be a positive integer"),
    ],
    ids=["unknown-dataset", "unknown-split", "unknown-shapes-task", "unknown-jsonl-task", "missing-file",
         "unknown-model", "folder-without-config", "missing-folder", "unknown-family", "policy-layers", "missing-policy",
         "unknown-ranker", "ranker-without-policy", "json-folder", "bad-limit"],
)
def test_cli_errors(tmp_path, capsys, monkeypatch, ckpt, data, args, message):
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    subs = {
        "{data}": str(data), "{tmp}": str(tmp_path), "{gpt2}": str(gpt2),
        "{policy5}": str(_policy_file(tmp_path, num_layers=5, name="p5.json")),
        "{policy2}": str(_policy_file(tmp_path, num_layers=NUM_LAYERS, name="p2.json")),
    }
    argv = {"--model": str(ckpt), "--data": str(data)}
    rest = []
    it = iter(args)
    for a in it:
        v = next(it)
        for k, s in subs.items():
            v = v.replace(k, s)
        if a in argv:
            argv[a] = v
        else:
            rest += [a, v]
    out = tmp_path / "out.json"
    if "--json" not in rest:
        rest += ["--json", str(out)]
    _fail_if_run(monkeypatch)
    rc = main(_eval(*[x for kv in argv.items() for x in kv], *rest))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("dop: error: ") and len(err.strip().splitlines()) == 1, err
    import re

    assert re.search(message, err), err
    assert not out.exists()


def test_failed_run_keeps_previous_json(tmp_path, ckpt, data, capsys):
    out = tmp_path / "out.json"
    out.write_text('{"previous": true}\n')
    rc = main(_eval("--model", ckpt, "--data", data, "--policy", _policy_file(tmp_path, num_layers=7),
                    "--json", out))
    assert rc == 2
    assert json.loads(out.read_text()) == {"previous": True}
    assert sorted(os.listdir(tmp_path)) == ["out.json", "policy.json"]


def test_write_json_atomic_leaves_nothing_on_failure(tmp_path):
    from dop.commands.eval import write_json_atomic

    out = tmp_path / "x.json"
    write_json_atomic(str(out), {"a": 1})
    with pytest.raises(ValueError):
        write_json_atomic(str(out), {"a": float("nan")})  # strict JSON: NaN is refused
    assert json.loads(out.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["x.json"]


def test_evaluate_rejects_layer_mismatch_before_work(loaded, monkeypatch):
    model, processor = loaded
    _fail_if_run(monkeypatch)
    with pytest.raises(ValueError, match="policy is for 4 decoder layers but the model has 2"):
        evaluate(model, processor, [{"image": None, "question": "q", "answers": ["a"]}],
                 policy=Policy(4, [1.0], {"mlp": [1]}), progress=False)


def test_processor_without_chat_template_fails_before_work(loaded, monkeypatch):
    model, processor = loaded
    monkeypatch.setattr(processor, "chat_template", None)
    _fail_if_run(monkeypatch)
    with pytest.raises(ValueError, match="has no chat template"):
        evaluate(model, processor, [{"image": None, "question": "q", "answers": ["a"]}], progress=False)


def test_demo_name_routes_to_the_demo_loader_and_prompt(monkeypatch, loaded):
    import dop.demo
    from dop.evaluate.loading import prompt_builder_for

    calls = []
    monkeypatch.setattr(dop.demo, "load_demo",
                        lambda attn_implementation="sdpa", name="demo": calls.append((attn_implementation, name)) or loaded)
    model, processor = load_model("demo", attn_implementation="eager")
    assert calls == [("eager", "demo")] and model is loaded[0] and processor is loaded[1]
    assert prompt_builder_for("demo") is dop.demo.build_prompt
    load_model("demo-base")  # the control model of issue 17 goes the same way
    assert calls[-1] == ("sdpa", "demo-base") and prompt_builder_for("demo-base") is dop.demo.build_prompt


def test_retrained_demo_folder_gets_the_demo_prompt(tmp_path):
    # a folder exported by scripts/train_demo.py was trained without the short-answer
    # instruction; any other folder (or a malformed training.json) gets the chat prompt
    import dop.demo
    from dop.evaluate.loading import chat_prompt, prompt_builder_for

    folder = tmp_path / "export"
    folder.mkdir()
    assert prompt_builder_for(str(folder)) is chat_prompt
    (folder / "training.json").write_text('{"command": "python scripts/train_demo.py --name x"}')
    assert prompt_builder_for(str(folder)) is dop.demo.build_prompt
    (folder / "training.json").write_text('{"command": "train.py"}')
    assert prompt_builder_for(str(folder)) is chat_prompt
    (folder / "training.json").write_text('[1, 2')
    assert prompt_builder_for(str(folder)) is chat_prompt
    assert prompt_builder_for(str(dop.demo.DEMO_DIR)) is dop.demo.build_prompt


def test_a_folder_declares_its_prompt(tmp_path):
    """Issue 15: the demo prompt follows dop_prompt.json (scripts/train_demo.py's export
    writes it), not a text search in training.json, which only old exports rely on."""
    import dop.demo
    from dop.evaluate.loading import chat_prompt, prompt_builder_for, write_prompt_marker

    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "training.json").write_text('{"command": "python my_train.py"}')
    write_prompt_marker(folder)
    assert json.loads((folder / "dop_prompt.json").read_text()) == {"format": "dop-prompt/1", "prompt": "demo"}
    assert prompt_builder_for(str(folder)) is dop.demo.build_prompt
    write_prompt_marker(folder, "chat")  # the declaration wins over an old export's training.json
    (folder / "training.json").write_text('{"command": "python scripts/train_demo.py"}')
    assert prompt_builder_for(str(folder)) is chat_prompt
    (folder / "dop_prompt.json").write_text("{not json")
    assert prompt_builder_for(str(folder)) is dop.demo.build_prompt  # unreadable: as if absent


def test_cli_eval_llava_next_checkpoint(tmp_path, data, capsys):
    # another family through the same path: model_type picks the class, AutoProcessor the processor
    from transformers import LlavaNextForConditionalGeneration

    path = build_tiny_llava(tmp_path / "next", constant_answer=True, family="llava_next")
    assert isinstance(load_model(str(path))[0], LlavaNextForConditionalGeneration)
    out = tmp_path / "next.json"
    assert main(_eval("--model", path, "--data", data, "--json", out, "--max-new-tokens", 1)) == 0
    doc = json.loads(out.read_text())
    assert doc["average"] == pytest.approx((EXIST_ACC + COLOR_ACC) / 2)
    # any-res: the 40 x 40 images get a base tile plus padded tiles, more than one tile's 16 tokens
    assert doc["num_visual_tokens"] > NUM_VISUAL_TOKENS


def test_batched_evaluation_equals_batch_size_one():
    """`dop eval --batch-size N`: the demo's predictions, scores and FLOPs equal batch size 1's,
    with a pruning policy and unpruned."""
    from dop.demo import build_prompt, load_demo
    from dop.demo.shapes import make_samples

    model, processor = load_demo()
    samples = make_samples("val", 7, seed=3)
    pol = dop.Policy(8, [0.25, 1.0], {"attn": [8, 2], "mlp": [8, 1]}, ranker="vispruner")
    kw = dict(policy=pol, progress=False, build_prompt=build_prompt, time_prefill=False, max_new_tokens=4)
    one = evaluate(model, processor, samples, batch_size=1, **kw)
    three = evaluate(model, processor, samples, batch_size=3, **kw)
    for a, b in ((one, three), (one.baseline, three.baseline)):
        assert [s.prediction for s in a.samples] == [s.prediction for s in b.samples]
        assert [s.score for s in a.samples] == [s.score for s in b.samples]
        assert [s.num_text_tokens for s in a.samples] == [s.num_text_tokens for s in b.samples]
        assert a.flops == b.flops
    assert one.flops != one.baseline.flops  # the policy was applied


def test_eval_result_reads_back_from_its_dict():
    """Issue 15: a stored evaluation (the main job's stage file) becomes an EvalResult again
    through explicit from_dict methods, field by field."""
    from dop.evaluate.metrics import TaskScore
    from dop.evaluate.runner import EvalResult, SampleResult

    samples = [SampleResult(0, "exist", "q?", ["yes"], "yes", 1.0, 16, 9, 2.5),
               SampleResult(1, "count", "how many?", ["2"], "3", 0.0, 16, 11, None)]
    tasks = {"exist": TaskScore("exist", 1, 1.0, True, 1.0, 1.0, 1.0, 1.0), "count": TaskScore("count", 1, 0.0)}
    res = EvalResult(samples, tasks, 0.5, 2.5, {"dop": {"decoder": 10.0, "total": 12.0}}, 16, 10, ranker="random",
                     wall_s=1.5, rel_avg=0.9)
    d = res.to_dict(with_samples=True)
    back = EvalResult.from_dict(d)
    assert back.to_dict(with_samples=True) == d
    assert back.samples == samples and back.tasks == tasks
