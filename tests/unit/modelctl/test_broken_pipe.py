"""A reader that goes away (`| head`): every command exits 141, quietly, the same way.

In-process runs give stdout a pipe that breaks after a few characters; real processes get
a pipe whose read end is closed, so that no message or traceback at exit goes unseen.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modelctl.exitcodes import ExitCode
from modelctl.render import Environment
from tests.unit.modelctl.fakes import (
    DONE,
    STATUS,
    STREAM_FOREVER,
    ClosingPipe,
    FakeDaemon,
    Reply,
    Terminal,
    json_reply,
    run_cli,
    stream_reply,
    token_events,
)

REPO = Path(__file__).resolve().parents[3]  # so `python -m modelctl` imports this checkout
DEADLINE_S = 10.0  # generous for a loaded 2-core machine; a run takes well under a second


def endless_stream() -> Reply:
    """A generation that runs until the client hangs up."""
    return stream_reply(token_events("tok "), delay_s=0.001, repeat_last=STREAM_FOREVER)


@pytest.mark.parametrize(
    "args",
    [["infer", "hi"], ["infer", "--json", "hi"]],
    ids=["text", "json"],
)
def test_infer_exits_141_and_hangs_up(
    fake: FakeDaemon, sock_args: list[str], args: list[str]
) -> None:
    fake.route("POST", "/infer", endless_stream())
    run = run_cli([*sock_args, *args], Terminal(stdout_limit=20))
    assert run.exit_code == ExitCode.BROKEN_PIPE
    assert len(run.stdout) == 20
    assert run.stderr == ""
    assert fake.disconnected.wait(DEADLINE_S)  # the daemon cancels the generation


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["text", "json"])
def test_no_stream_exits_141(fake: FakeDaemon, sock_args: list[str], json_flag: list[str]) -> None:
    whole = {k: v for k, v in DONE.items() if k != "type"} | {"text": "Paris is the capital."}
    fake.route("POST", "/infer", json_reply(whole))
    run = run_cli([*sock_args, "infer", "--no-stream", *json_flag, "hi"], Terminal(stdout_limit=3))
    assert (run.exit_code, run.stderr) == (ExitCode.BROKEN_PIPE, "")


@pytest.mark.parametrize(
    "args",
    [["status", "--watch"], ["status", "--watch", "--json"], ["status"], ["models"]],
    ids=lambda a: " ".join(a),
)
def test_views_exit_141(fake: FakeDaemon, sock_args: list[str], args: list[str]) -> None:
    fake.route("GET", "/status", json_reply(STATUS))
    fake.route("GET", "/models", json_reply({"models": [{"id": "a.gguf", "state": "ready"}]}))
    term = Terminal(stdout_limit=30, max_sleeps=50)  # a watch would end at 50 (exit 0)
    run = run_cli([*sock_args, *args], term)
    assert (run.exit_code, run.stderr) == (ExitCode.BROKEN_PIPE, "")
    assert len(term.sleeps) < 2  # the watch stopped at the first snapshot that did not fit


def test_a_terminal_console_leaves_a_broken_pipe_to_modelctl() -> None:
    # rich would exit 1 by itself (SystemExit); modelctl's group must see the error
    env = Environment(stdin=io.StringIO(), stdout=ClosingPipe(0), stderr=io.StringIO())
    with pytest.raises(BrokenPipeError):
        env.out.print("x")


# ---- real processes ----------------------------------------------------------------------


def run_into_closed_pipe(args: list[str]) -> subprocess.CompletedProcess[bytes]:
    """`python -m modelctl ARGS` writing into a pipe nobody reads any more."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "modelctl", *args],
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            stderr=subprocess.PIPE,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            timeout=DEADLINE_S,
            check=False,
        )
    finally:
        os.close(write_end)


@pytest.mark.parametrize(
    "args",
    [
        ["infer", "hi"],
        ["infer", "--json", "hi"],
        ["status", "--watch", "--interval", "0.1"],
        ["models"],
        ["--help"],
    ],
    ids=lambda a: " ".join(a),
)
def test_a_real_process_exits_141_without_a_word(fake: FakeDaemon, args: list[str]) -> None:
    fake.route("POST", "/infer", endless_stream())
    fake.route("GET", "/status", json_reply(STATUS))
    fake.route("GET", "/models", json_reply({"models": [{"id": "a.gguf", "state": "ready"}]}))
    result = run_into_closed_pipe(["--socket", str(fake.socket_path), *args])
    assert result.stderr == b""  # no traceback, no "Exception ignored", no message
    assert result.returncode == ExitCode.BROKEN_PIPE
    if args[0] == "infer":
        assert fake.disconnected.wait(DEADLINE_S)
