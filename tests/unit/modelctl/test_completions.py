"""Shell completion: the checked-in scripts are current, and model ids come from the daemon."""

from __future__ import annotations

import time
from pathlib import Path

from click.testing import CliRunner

from modelctl.cli import cli
from modelctl.completions import generate, render_scripts, stale_files
from tests.unit.modelctl.fakes import MODELS, FakeDaemon, json_reply

COMPLETIONS_DIR = Path(__file__).resolve().parents[3] / "completions"


def test_checked_in_scripts_are_current() -> None:
    assert stale_files(COMPLETIONS_DIR) == [], "completions are stale: run `make completions`"


def test_scripts_cover_three_shells_and_call_modelctl() -> None:
    scripts = render_scripts()
    assert sorted(scripts) == ["modelctl.bash", "modelctl.fish", "modelctl.zsh"]
    for text in scripts.values():
        assert "_MODELCTL_COMPLETE" in text


def test_generate_writes_and_check_detects_staleness(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(generate, [str(tmp_path), "--check"]).exit_code == 1
    assert runner.invoke(generate, [str(tmp_path)]).exit_code == 0
    assert runner.invoke(generate, [str(tmp_path), "--check"]).exit_code == 0
    (tmp_path / "modelctl.zsh").write_text("# edited\n")
    result = runner.invoke(generate, [str(tmp_path), "--check"])
    assert result.exit_code == 1
    assert "modelctl.zsh" in result.stderr


def complete(words: str, env: dict[str, str] | None = None) -> list[str]:
    """What bash would offer for the last word of WORDS (an empty last word: after a space)."""
    cword = len(words.split()) - (0 if words.endswith(" ") else 1)
    result = CliRunner().invoke(
        cli,
        [],
        prog_name="modelctl",
        env={
            "_MODELCTL_COMPLETE": "bash_complete",
            "COMP_WORDS": words,
            "COMP_CWORD": str(cword),
            "MODELCTL_SOCKET": None,
            "MODELCTL_URL": None,
            **(env or {}),
        },
    )
    assert result.exit_code == 0, result.output
    return [line.split(",", 1)[1] for line in result.stdout.splitlines() if line]


def test_commands_complete() -> None:
    assert complete("modelctl ") == ["health", "infer", "models", "status"]


def test_model_ids_complete_from_the_daemon(fake: FakeDaemon) -> None:
    fake.route("GET", "/models", json_reply(MODELS))
    env = {"MODELCTL_SOCKET": str(fake.socket_path)}
    assert complete("modelctl infer -m ", env) == ["smollm2.gguf", "broken.gguf"]
    assert complete("modelctl infer --model sm", env) == ["smollm2.gguf"]


def test_model_ids_complete_with_socket_on_the_command_line(fake: FakeDaemon) -> None:
    fake.route("GET", "/models", json_reply(MODELS))
    words = f"modelctl --socket {fake.socket_path} infer -m b"
    assert complete(words) == ["broken.gguf"]


def test_model_ids_complete_to_nothing_without_a_daemon(tmp_path: Path) -> None:
    started = time.monotonic()
    assert complete("modelctl infer -m ", {"MODELCTL_SOCKET": str(tmp_path / "no.sock")}) == []
    assert time.monotonic() - started < 2.0
