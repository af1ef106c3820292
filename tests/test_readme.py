"""CI runs the README's test command word for word: the two may never drift apart."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
