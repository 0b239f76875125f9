"""`modelctl models`, `status` (once and `--watch`) and `health` against the fake daemon."""

from __future__ import annotations

import json

import pytest

from modelctl.exitcodes import ExitCode
from tests.unit.modelctl.fakes import (
    MODELS,
    STATUS,
    FakeDaemon,
    Reply,
    Terminal,
    error_reply,
    json_reply,
    plain,
    run_cli,
)


def test_models_table(fake: FakeDaemon, sock_args: list[str]) -> None:
    fake.route("GET", "/models", json_reply(MODELS))
    run = run_cli([*sock_args, "models"])
    assert run.exit_code == 0
    assert run.stdout.splitlines()[0].split() == ["ID", "SIZE", "EST", "VRAM", "VRAM", "STATE"]
    assert "smollm2.gguf" in run.stdout
    assert "\x1b[" not in run.stdout  # no colours in a pipe
    assert run.stderr == ""


def test_models_json_is_the_daemon_answer(fake: FakeDaemon, sock_args: list[str]) -> None:
    raw = json.dumps(MODELS, indent=1)
    fake.route("GET", "/models", Reply(body=raw.encode()))
    run = run_cli([*sock_args, "models", "--json"])
    assert run.stdout == raw + "\n"


def test_models_in_a_terminal_has_colours(fake: FakeDaemon, sock_args: list[str]) -> None:
    fake.route("GET", "/models", json_reply(MODELS))
    run = run_cli([*sock_args, "models"], Terminal(stdout_tty=True, stderr_tty=True))
    assert "\x1b[" in run.stdout


def test_models_unreachable_exits_5(tmp_path: object) -> None:
    run = run_cli(["--socket", f"{tmp_path}/no.sock", "models"])
    assert run.exit_code == ExitCode.UNREACHABLE
    assert "no.sock" in run.stderr


def test_status_once(fake: FakeDaemon, sock_args: list[str]) -> None:
    fake.route("GET", "/status", json_reply(STATUS))
    run = run_cli([*sock_args, "status"])
    assert run.exit_code == 0
    assert "612 / 24000 MB used" in run.stdout
    assert "59s ago" in run.stdout


def test_status_json(fake: FakeDaemon, sock_args: list[str]) -> None:
    fake.route("GET", "/status", json_reply(STATUS))
    assert json.loads(run_cli([*sock_args, "status", "--json"]).stdout) == STATUS


def test_status_watch_redraws_until_ctrl_c(fake: FakeDaemon, sock_args: list[str]) -> None:
    busier = json.loads(json.dumps(STATUS))
    busier["instances"][0]["queue_depth"] = 9
    fake.route("GET", "/status", json_reply(STATUS), json_reply(busier))
    term = Terminal(stdout_tty=True, stderr_tty=True, max_sleeps=3)
    run = run_cli([*sock_args, "status", "--watch", "--interval", "0.5"], term)
    assert run.exit_code == 0  # Ctrl-C is how a watch ends
    assert term.sleeps == [0.5, 0.5, 0.5]
    assert len(fake.requests) == 3
    assert run.stdout.count("Ctrl-C to stop") >= 3  # a frame a refresh (Live repeats the last)
    assert "\x1b[2K" in run.stdout  # redrawn in place: lines erased, not appended
    last_row = plain(run.stdout).rstrip().splitlines()[-1]
    assert last_row.split()[-2:] == ["1", "9"]  # the last frame has the newer figures


def test_status_watch_in_a_pipe_prints_snapshots(fake: FakeDaemon, sock_args: list[str]) -> None:
    fake.route("GET", "/status", json_reply(STATUS))
    run = run_cli([*sock_args, "status", "--watch"], Terminal(max_sleeps=2))
    assert run.exit_code == 0
    assert run.stdout.count("612 / 24000 MB used") == 2


def test_status_watch_json_prints_one_line_per_refresh(
    fake: FakeDaemon, sock_args: list[str]
) -> None:
    fake.route("GET", "/status", json_reply(STATUS))
    run = run_cli([*sock_args, "status", "--watch", "--json"], Terminal(max_sleeps=3))
    assert [json.loads(line) for line in run.stdout.splitlines()] == [STATUS] * 3


def test_status_watch_survives_a_daemon_error(fake: FakeDaemon, sock_args: list[str]) -> None:
    fake.route(
        "GET",
        "/status",
        json_reply(STATUS),
        error_reply(503, "shutting_down", "stopping"),
        json_reply(STATUS),
    )
    run = run_cli([*sock_args, "status", "--watch"], Terminal(max_sleeps=3))
    assert run.exit_code == 0
    assert "stopping" in run.stdout
    assert run.stdout.count("612 / 24000 MB used") == 2


def test_status_watch_unreachable_at_start_exits_5(tmp_path: object) -> None:
    run = run_cli(["--socket", f"{tmp_path}/no.sock", "status", "--watch"], Terminal(max_sleeps=1))
    assert run.exit_code == ExitCode.UNREACHABLE


@pytest.mark.parametrize(
    ("ready", "code", "word"), [(True, 0, "live, ready"), (False, 1, "live, not ready")]
)
def test_health(fake: FakeDaemon, sock_args: list[str], ready: bool, code: int, word: str) -> None:
    fake.route("GET", "/healthz", json_reply({"status": "ok"}))
    fake.route("GET", "/readyz", json_reply({"ready": ready}, status=200 if ready else 503))
    run = run_cli([*sock_args, "health"])
    assert run.exit_code == code
    assert len(run.stdout.splitlines()) == 1
    assert word in run.stdout
    assert str(fake.socket_path) in run.stdout


def test_health_json(fake: FakeDaemon, sock_args: list[str]) -> None:
    fake.route("GET", "/healthz", json_reply({"status": "ok"}))
    fake.route("GET", "/readyz", json_reply({"ready": False}, status=503))
    run = run_cli([*sock_args, "health", "--json"])
    assert (run.exit_code, json.loads(run.stdout)) == (1, {"live": True, "ready": False})


def test_health_unreachable_exits_5(tmp_path: object) -> None:
    run = run_cli(["--socket", f"{tmp_path}/no.sock", "health"])
    assert run.exit_code == ExitCode.UNREACHABLE
    assert "modeld" in run.stderr


@pytest.mark.parametrize(
    "args", [["models"], ["status"], ["status", "--watch"], ["health"]], ids=lambda a: " ".join(a)
)
def test_piped_views_have_no_trailing_blanks(
    fake: FakeDaemon, sock_args: list[str], args: list[str]
) -> None:
    fake.route("GET", "/models", json_reply(MODELS))
    fake.route("GET", "/status", json_reply(STATUS))
    fake.route("GET", "/healthz", json_reply({"status": "ok"}))
    fake.route("GET", "/readyz", json_reply({"ready": True}))
    run = run_cli([*sock_args, *args], Terminal(max_sleeps=2))
    assert run.exit_code == 0
    assert run.stdout.strip()
    assert [line for line in run.stdout.splitlines() if line != line.rstrip()] == []
    assert run.stdout.endswith("\n")


def test_models_shows_no_estimate_for_an_unreadable_file(
    fake: FakeDaemon, sock_args: list[str]
) -> None:
    garbage = {
        "id": "garbage.gguf",
        "size_bytes": 100,
        "est_vram_mb": None,  # a file the daemon cannot serve has no estimate
        "state": "error",
        "vram_mb": None,
        "error": "bad magic (not a GGUF file)",
    }
    fake.route("GET", "/models", json_reply({"models": [garbage]}))
    row = run_cli([*sock_args, "models"]).stdout.splitlines()[2]
    assert row == "garbage.gguf   100 B          -      -   error (bad magic (not a GGUF file))"


@pytest.mark.parametrize("args", [["models"], ["status"]])
def test_a_long_error_reason_keeps_rows_on_one_line_at_80_columns(
    fake: FakeDaemon, sock_args: list[str], args: list[str]
) -> None:
    reason = "llama.cpp could not load the file: unknown model architecture 'qwen3moe' " * 2
    models = json.loads(json.dumps(MODELS))
    models["models"][1]["error"] = reason
    status = json.loads(json.dumps(STATUS))
    status["instances"][0].update(state="error", error=reason, vram_mb=None)
    fake.route("GET", "/models", json_reply(models))
    fake.route("GET", "/status", json_reply(status))
    run = run_cli([*sock_args, *args], Terminal(stdout_tty=True, stderr_tty=True, width=80))
    lines = plain(run.stdout).splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    (row,) = [line for line in lines if "error (" in line]  # the reason on one line, cut
    assert "error (llama.cpp" in row and "…" in row
    assert reason in run_cli([*sock_args, *args, "--json"]).stdout  # whole in --json
