"""CI runs the README's test command word for word: the two may never drift apart."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _block(marker: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    _, body, _ = text.split(f"<!-- {marker} -->", 2)
    return [line for line in body.splitlines() if line.strip() and not line.startswith("```")]


def test_ci_runs_the_readme_test_command():
    [command] = _block("test-command")
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines


def test_readme_main_command_runs_dop_run():
    [command] = _block("main-command")
    assert command.startswith("python3 -m venv .venv") and command.endswith(".venv/bin/dop run")
    assert "torch==2.13.0" in command


def test_readme_python_api_runs_as_written(capsys):
    """The README's Python API block, executed word for word on the demo model (issue 16: it
    used undefined names, searched with the wrong prompt and counted FLOPs on another model)."""
    [code] = [b for b in (ROOT / "README.md").read_text().split("<!-- python-api -->")[1:2]]
    code = code.strip().removeprefix("```python").removesuffix("```")
    scope: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), scope)
    policy = scope["policy"]
    assert policy.num_layers == 8 and not policy.is_unpruned()
    assert policy.meta["budget"] == "tokens:32" and policy.ranker == "vispruner"
    printed = capsys.readouterr().out.splitlines()
    assert 0.0 < float(printed[-1]) < 1.0  # the decoder FLOPs fraction of the searched policy
    # search() picked the demo's own prompt: the reference shape is the demo prompt's, not the chat template's
    from dop.demo import build_prompt
    from dop.evaluate.loading import chat_prompt
    from dop.search.divergence import prepare_samples, reference_shape

    model, proc, val = scope["model"], scope["processor"], scope["val"]
    demo_shape = reference_shape(prepare_samples(model, proc, val, build_prompt))
    chat_shape = reference_shape(prepare_samples(model, proc, val, chat_prompt))
    assert demo_shape != chat_shape
    assert (list(demo_shape[0]), demo_shape[1]) == (scope["res"].shape["visual_tokens"], scope["res"].shape["text_tokens"])
