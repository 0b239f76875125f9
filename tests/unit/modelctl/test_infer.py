"""`modelctl infer` against the fake daemon: arguments, pipe/TTY/--json output, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modelctl.exitcodes import ExitCode
from tests.unit.modelctl.fakes import (
    DONE,
    FakeDaemon,
    Terminal,
    error_reply,
    json_reply,
    plain,
    run_cli,
    stream_reply,
    token_events,
)


def test_pipe_output_carries_only_the_text(fake: FakeDaemon, sock_args: list[str]) -> None:
    fake.route("POST", "/infer", stream_reply([*token_events(" Paris", ".", " It"), DONE]))
    run = run_cli([*sock_args, "infer", "-m", "tiny.gguf", "The capital of France is"])
    assert run.exit_code == 0
    assert run.stdout == " Paris. It\n"
    assert run.stderr == ""


def test_text_ending_in_newline_gets_no_extra_one(fake: FakeDaemon, sock_args: list[str]) -> None:
    fake.route("POST", "/infer", stream_reply([*token_events("a", "b\n"), DONE]))
    assert run_cli([*sock_args, "infer", "x"]).stdout == "ab\n"


def test_request_carries_only_given_options(fake: FakeDaemon, sock_args: list[str]) -> None:
    fake.route("POST", "/infer", stream_reply([DONE]))
    args = ["infer", "-m", "tiny.gguf", "--max-tokens", "5", "--temperature", "0"]
    args += ["--top-p", "0.5", "--top-k", "0", "--seed", "7", "--stop", "\n", "--stop", "."]
    run = run_cli([*sock_args, *args, "hi"])
    assert run.exit_code == 0, run.stderr
    assert fake.requests[0].json() == {
        "prompt": "hi",
        "stream": True,
        "model": "tiny.gguf",
        "max_tokens": 5,
        "temperature": 0.0,
        "top_p": 0.5,
        "top_k": 0,
        "seed": 7,
        "stop": ["\n", "."],
    }
    assert fake.requests[0].headers["accept"] == "application/x-ndjson"


def test_defaults_are_left_to_the_daemon(fake: FakeDaemon, sock_args: list[str]) -> None:
    fake.route("POST", "/infer", stream_reply([DONE]))
    run_cli([*sock_args, "infer", "hi"])
    assert fake.requests[0].json() == {"prompt": "hi", "stream": True}


@pytest.mark.parametrize("args", [["-"], []])
def test_prompt_from_piped_stdin(fake: FakeDaemon, sock_args: list[str], args: list[str]) -> None:
    fake.route("POST", "/infer", stream_reply([DONE]))
    run = run_cli([*sock_args, "infer", *args], Terminal(stdin="line one\nline two\n"))
    assert run.exit_code == 0, run.stderr
    assert fake.requests[0].json()["prompt"] == "line one\nline two\n"


def test_argument_wins_over_piped_stdin(fake: FakeDaemon, sock_args: list[str]) -> None:
    fake.route("POST", "/infer", stream_reply([DONE]))
    run_cli([*sock_args, "infer", "from arg"], Terminal(stdin="from stdin"))
    assert fake.requests[0].json()["prompt"] == "from arg"


def test_no_prompt_at_a_terminal_is_a_usage_error(fake: FakeDaemon, sock_args: list[str]) -> None:
    run = run_cli([*sock_args, "infer"], Terminal(stdin_tty=True))
    assert run.exit_code == ExitCode.USAGE
    assert "PROMPT" in run.stderr
    assert fake.requests == []


def test_empty_stdin_is_a_usage_error(fake: FakeDaemon, sock_args: list[str]) -> None:
    assert run_cli([*sock_args, "infer"], Terminal(stdin="")).exit_code == ExitCode.USAGE


@pytest.mark.parametrize(
    "option", [["--top-p", "0"], ["--max-tokens", "0"], ["--temperature", "-1"], ["--seed", "x"]]
)
def test_out_of_range_options_are_usage_errors(sock_args: list[str], option: list[str]) -> None:
    assert run_cli([*sock_args, "infer", *option, "hi"]).exit_code == ExitCode.USAGE


def test_json_passes_event_lines_unchanged(fake: FakeDaemon, sock_args: list[str]) -> None:
    lines = [
        b'{"type":"token","text":" Paris"}',
        b'{"type": "token", "text": "\\u00e9"}',  # odd spacing and escapes survive as is
        json.dumps(DONE).encode(),
    ]
    reply = stream_reply([])
    reply.chunks = [line + b"\n" for line in lines]
    fake.route("POST", "/infer", reply)
    run = run_cli([*sock_args, "infer", "--json", "x"], Terminal(stdout_tty=True, stderr_tty=True))
    assert run.exit_code == 0
    assert run.stdout.encode() == b"".join(line + b"\n" for line in lines)
    assert [json.loads(line)["type"] for line in run.stdout.splitlines()] == [
        "token",
        "token",
        "done",
    ]
    assert run.stderr == ""  # no spinner, no stats line with --json


def test_no_stream_prints_the_text(fake: FakeDaemon, sock_args: list[str]) -> None:
    whole = {k: v for k, v in DONE.items() if k != "type"} | {"text": "Paris."}
    fake.route("POST", "/infer", json_reply(whole))
    run = run_cli([*sock_args, "infer", "--no-stream", "x"])
    assert (run.exit_code, run.stdout) == (0, "Paris.\n")
    assert fake.requests[0].json()["stream"] is False


def test_no_stream_json_prints_the_answer(fake: FakeDaemon, sock_args: list[str]) -> None:
    fake.route("POST", "/infer", json_reply({"text": "Paris.", "model": "tiny.gguf"}))
    run = run_cli([*sock_args, "infer", "--no-stream", "--json", "x"])
    assert json.loads(run.stdout) == {"text": "Paris.", "model": "tiny.gguf"}


def test_terminal_shows_text_then_dim_stats_line(fake: FakeDaemon, sock_args: list[str]) -> None:
    fake.route("POST", "/infer", stream_reply([*token_events(" Paris", ".", "!"), DONE]))
    run = run_cli([*sock_args, "infer", "x"], Terminal(stdout_tty=True, stderr_tty=True))
    assert run.exit_code == 0
    assert run.stdout == " Paris.!\n"
    stats = plain(run.stderr).strip().splitlines()[-1]
    # 3 tokens; (3 - 1) tokens over the 40 ms after the first one; ttft 20 ms
    assert (
        stats == "3 tokens · 50.0 tokens/s · first token 20 ms · stopped at max tokens · tiny.gguf"
    )
    assert "\x1b[2m" in run.stderr  # dim


def test_model_not_found_exits_3(fake: FakeDaemon, sock_args: list[str]) -> None:
    fake.route("POST", "/infer", error_reply(404, "model_not_found", "no model 'x.gguf'"))
    run = run_cli([*sock_args, "infer", "-m", "x.gguf", "hi"])
    assert run.exit_code == ExitCode.MODEL_NOT_FOUND
    assert run.stdout == ""
    assert run.stderr == "error: no model 'x.gguf' (model_not_found)\n"


@pytest.mark.parametrize("code", ["queue_full", "queue_timeout", "overloaded"])
def test_busy_exits_4(fake: FakeDaemon, sock_args: list[str], code: str) -> None:
    fake.route("POST", "/infer", error_reply(429, code, "busy", retry_after_ms=1000))
    term = Terminal()
    run = run_cli([*sock_args, "infer", "hi"], term)
    assert run.exit_code == ExitCode.BUSY
    assert term.sleeps == []  # no --retry: no waiting
    assert len(fake.requests) == 1


def test_retry_waits_retry_after_then_succeeds(fake: FakeDaemon, sock_args: list[str]) -> None:
    busy = error_reply(429, "queue_full", "queue full", retry_after_ms=2000)
    fake.route("POST", "/infer", busy, busy, stream_reply([*token_events("ok"), DONE]))
    term = Terminal()
    run = run_cli([*sock_args, "infer", "--retry", "3", "hi"], term)
    assert run.exit_code == 0, run.stderr
    assert run.stdout == "ok\n"
    assert term.sleeps == [2.0, 2.0]
    assert run.stderr.splitlines() == [
        "daemon busy (queue_full): retrying in 2s (retry 1 of 3)",
        "daemon busy (queue_full): retrying in 2s (retry 2 of 3)",
    ]


def test_retry_gives_up_after_the_limit(fake: FakeDaemon, sock_args: list[str]) -> None:
    fake.route("POST", "/infer", error_reply(429, "overloaded", "too many", retry_after_ms=1000))
    term = Terminal()
    run = run_cli([*sock_args, "infer", "--retry", "2", "hi"], term)
    assert run.exit_code == ExitCode.BUSY
    assert len(fake.requests) == 3
    assert term.sleeps == [1.0, 1.0]


def test_retry_does_not_retry_other_errors(fake: FakeDaemon, sock_args: list[str]) -> None:
    fake.route("POST", "/infer", error_reply(500, "model_load_failed", "bad file"))
    run = run_cli([*sock_args, "infer", "--retry", "5", "hi"])
    assert run.exit_code == ExitCode.ERROR
    assert len(fake.requests) == 1


def test_error_event_mid_stream(fake: FakeDaemon, sock_args: list[str]) -> None:
    crash = {"type": "error", "error": {"code": "worker_crashed", "message": "worker died"}}
    fake.route("POST", "/infer", stream_reply([*token_events("par"), crash]))
    run = run_cli([*sock_args, "infer", "hi"])
    assert run.exit_code == ExitCode.ERROR
    assert run.stdout == "par\n"
    assert run.stderr == "error: worker died (worker_crashed)\n"


def test_json_error_event_is_passed_then_reported(fake: FakeDaemon, sock_args: list[str]) -> None:
    gone = {"type": "error", "error": {"code": "model_unloaded", "message": "unloaded"}}
    fake.route("POST", "/infer", stream_reply([gone]))
    run = run_cli([*sock_args, "infer", "--json", "hi"])
    assert run.exit_code == ExitCode.ERROR
    assert json.loads(run.stdout) == gone
    assert "(model_unloaded)" in run.stderr


def test_stream_without_done_is_an_error(fake: FakeDaemon, sock_args: list[str]) -> None:
    fake.route("POST", "/infer", stream_reply(token_events("a")))
    run = run_cli([*sock_args, "infer", "hi"])
    assert run.exit_code == ExitCode.ERROR
    assert "without a done event" in run.stderr


def test_unreachable_socket_exits_5_with_a_hint(tmp_path: object) -> None:
    path = f"{tmp_path}/nothing.sock"
    run = run_cli(["--socket", path, "infer", "hi"])
    assert run.exit_code == ExitCode.UNREACHABLE
    assert path in run.stderr
    assert "systemctl --user start modeld.socket" in run.stderr
    assert run.stdout == ""


def test_url_reaches_the_daemon_over_tcp(fake: FakeDaemon) -> None:
    fake.route("POST", "/infer", stream_reply([*token_events("tcp"), DONE]))
    run = run_cli(["--url", fake.url, "infer", "hi"])
    assert (run.exit_code, run.stdout) == (0, "tcp\n")
    assert fake.requests[0].headers["host"] == f"127.0.0.1:{fake.port}"


def test_env_vars_name_the_endpoint(fake: FakeDaemon) -> None:
    fake.route("POST", "/infer", stream_reply([*token_events("env"), DONE]))
    run = run_cli(["infer", "hi"], env={"MODELCTL_SOCKET": str(fake.socket_path)})
    assert run.stdout == "env\n"
    run = run_cli(["infer", "hi"], env={"MODELCTL_URL": fake.url})
    assert run.stdout == "env\n"


def test_command_line_socket_wins_over_env_url(fake: FakeDaemon, sock_args: list[str]) -> None:
    fake.route("POST", "/infer", stream_reply([*token_events("s"), DONE]))
    run = run_cli([*sock_args, "infer", "hi"], env={"MODELCTL_URL": "http://127.0.0.1:1"})
    assert run.stdout == "s\n"


@pytest.mark.parametrize(
    "args",
    [
        ["--url", "https://localhost:1"],
        ["--url", "http://127.0.0.1:1", "--socket", "/x.sock"],
    ],
)
def test_bad_endpoint_options_are_usage_errors(args: list[str]) -> None:
    assert run_cli([*args, "infer", "hi"]).exit_code == ExitCode.USAGE


def test_terminal_shows_a_spinner_while_waiting(fake: FakeDaemon, sock_args: list[str]) -> None:
    whole = {k: v for k, v in DONE.items() if k != "type"} | {"text": "late"}
    reply = json_reply(whole)
    reply.delay_s = 0.3  # the head comes late: queued, or the model loads
    fake.route("POST", "/infer", reply)
    term = Terminal(stdout_tty=True, stderr_tty=True)
    run = run_cli([*sock_args, "infer", "-m", "tiny.gguf", "--no-stream", "hi"], term)
    assert run.exit_code == 0
    assert run.stdout == "late\n"
    # the daemon answers --no-stream only at the end: the spinner spans the generation too
    assert "waiting for tiny.gguf to finish answering" in plain(run.stderr)
    assert "start answering" not in plain(run.stderr)
    assert plain(run.stderr).rstrip().endswith("tiny.gguf")  # the stats line comes last


def test_streaming_spinner_waits_for_the_first_token(
    fake: FakeDaemon, sock_args: list[str]
) -> None:
    fake.route("POST", "/infer", stream_reply([*token_events("hi"), DONE], head_delay_s=0.3))
    term = Terminal(stdout_tty=True, stderr_tty=True)
    run = run_cli([*sock_args, "infer", "hi"], term)
    assert run.exit_code == 0
    assert "waiting for the default model to start answering" in plain(run.stderr)
    assert "finish answering" not in plain(run.stderr)


# ---- daemon-side usage errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--temperature", "150"], "'temperature' must be in [0, 100], got 150"),
        (["--max-tokens", "2000000"], "'max_tokens' must be between 1 and 1048576, got 2000000"),
    ],
)
def test_a_value_the_daemon_refuses_is_a_usage_error(
    fake: FakeDaemon, sock_args: list[str], option: list[str], message: str
) -> None:
    param = option[0].removeprefix("--").replace("-", "_")
    fake.route("POST", "/infer", error_reply(400, "invalid_request", message, param=param))
    run = run_cli([*sock_args, "infer", *option, "hi"])
    assert run.exit_code == ExitCode.USAGE  # as for `--temperature -1`, caught by modelctl
    assert run.stdout == ""
    assert run.stderr == f"error: {message} (invalid_request)\n"


def test_an_invalid_request_error_event_is_a_usage_error(
    fake: FakeDaemon, sock_args: list[str]
) -> None:
    bad = {"type": "error", "error": {"code": "invalid_request", "message": "no tokens"}}
    fake.route("POST", "/infer", stream_reply([bad]))
    assert run_cli([*sock_args, "infer", "hi"]).exit_code == ExitCode.USAGE


def test_no_model_and_no_default_is_a_usage_error_with_a_hint(
    fake: FakeDaemon, sock_args: list[str]
) -> None:
    message = "no 'model' given and modeld has no --default-model"
    fake.route("POST", "/infer", error_reply(400, "no_default_model", message))
    run = run_cli([*sock_args, "infer", "hi"])
    assert run.exit_code == ExitCode.USAGE
    assert run.stderr.splitlines() == [
        f"error: {message} (no_default_model)",
        "hint: name one with -m MODEL (`modelctl models` lists them)",
    ]


def test_a_long_error_is_one_line_the_terminal_wraps(
    fake: FakeDaemon, sock_args: list[str]
) -> None:
    message = "model 'garbage.gguf' failed to load: bad magic (not a GGUF file)"
    fake.route("POST", "/infer", error_reply(500, "model_load_failed", message))
    term = Terminal(stdout_tty=True, stderr_tty=True, width=80)
    run = run_cli([*sock_args, "infer", "-m", "garbage", "hi"], term)
    assert plain(run.stderr).endswith(f"error: {message} (model_load_failed)\n")


def test_prompt_too_long_stays_a_plain_error(fake: FakeDaemon, sock_args: list[str]) -> None:
    fake.route("POST", "/infer", error_reply(400, "prompt_too_long", "9000 tokens > 8192"))
    assert run_cli([*sock_args, "infer", "hi"]).exit_code == ExitCode.ERROR


def test_an_empty_stop_string_is_refused_before_sending(
    fake: FakeDaemon, sock_args: list[str]
) -> None:
    run = run_cli([*sock_args, "infer", "--stop", ".", "--stop", "", "hi"])
    assert run.exit_code == ExitCode.USAGE
    assert "--stop" in run.stderr and "empty" in run.stderr
    assert fake.requests == []


@pytest.mark.parametrize(
    ("args", "stdin", "what"),
    [
        ([], "ab\udcffcd", "the prompt read from stdin"),  # byte 0xff, as Python reads it
        (["-"], "ok\udcc3", "the prompt read from stdin"),
        (["ab\udcffcd"], "", "the PROMPT argument"),  # argv decodes the same way
    ],
)
def test_a_prompt_that_is_not_utf8_is_a_usage_error(
    fake: FakeDaemon, sock_args: list[str], args: list[str], stdin: str, what: str
) -> None:
    run = run_cli([*sock_args, "infer", *args], Terminal(stdin=stdin))
    assert run.exit_code == ExitCode.USAGE
    assert f"{what} is not valid UTF-8 (byte 0x" in run.stderr
    assert fake.requests == []


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])
def test_bytes_on_stdin_that_are_not_utf8(fake: FakeDaemon, errors: str) -> None:
    # A real process: how Python decodes stdin depends on the locale; either way, exit 2.
    repo = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": str(repo), "PYTHONIOENCODING": f"utf-8:{errors}"}
    result = subprocess.run(
        [sys.executable, "-m", "modelctl", "--socket", str(fake.socket_path), "infer"],
        input=b"ab\xffcd",
        capture_output=True,
        cwd=repo,
        env=env,
        timeout=10,
        check=False,
    )
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert b"the prompt read from stdin is not valid utf-8 (byte 0xff" in result.stderr.lower()
    assert b"Traceback" not in result.stderr
    assert fake.requests == []


# ---- the newline at the end ------------------------------------------------------------------


@pytest.mark.parametrize("tty", [False, True], ids=["pipe", "terminal"])
def test_an_empty_answer_is_one_empty_line(
    fake: FakeDaemon, sock_args: list[str], tty: bool
) -> None:
    nothing = DONE | {"usage": {"prompt_tokens": 6, "completion_tokens": 0}}
    fake.route("POST", "/infer", stream_reply([nothing]))
    term = Terminal(stdout_tty=tty, stderr_tty=tty)
    run = run_cli([*sock_args, "infer", "--stop", "x", "hi"], term)
    assert (run.exit_code, run.stdout) == (0, "\n")
    if tty:
        assert plain(run.stderr).rstrip().splitlines()[-1].startswith("no tokens · done in ")


def test_an_empty_whole_answer_is_one_empty_line(fake: FakeDaemon, sock_args: list[str]) -> None:
    whole = {k: v for k, v in DONE.items() if k != "type"} | {"text": ""}
    fake.route("POST", "/infer", json_reply(whole))
    assert run_cli([*sock_args, "infer", "--no-stream", "hi"]).stdout == "\n"


def test_text_keeps_its_own_final_newlines(fake: FakeDaemon, sock_args: list[str]) -> None:
    fake.route("POST", "/infer", stream_reply([*token_events("a\n", "\n"), DONE]))
    assert run_cli([*sock_args, "infer", "hi"]).stdout == "a\n\n"  # the model's, as is


def test_json_gets_no_newline_of_its_own(fake: FakeDaemon, sock_args: list[str]) -> None:
    fake.route("POST", "/infer", stream_reply([DONE]))
    run = run_cli([*sock_args, "infer", "--json", "hi"])
    assert run.stdout == json.dumps(DONE) + "\n"


def test_an_error_before_any_text_leaves_stdout_empty(
    fake: FakeDaemon, sock_args: list[str]
) -> None:
    crash = {"type": "error", "error": {"code": "worker_crashed", "message": "worker died"}}
    fake.route("POST", "/infer", stream_reply([crash]))
    run = run_cli([*sock_args, "infer", "hi"])
    assert (run.exit_code, run.stdout) == (ExitCode.ERROR, "")


def test_a_stream_cut_before_any_text_leaves_stdout_empty(
    fake: FakeDaemon, sock_args: list[str]
) -> None:
    fake.route("POST", "/infer", stream_reply([]))
    run = run_cli([*sock_args, "infer", "hi"])
    assert (run.exit_code, run.stdout) == (ExitCode.ERROR, "")


# ---- the stats line --------------------------------------------------------------------------


def test_a_single_token_has_no_rate(fake: FakeDaemon, sock_args: list[str]) -> None:
    one = DONE | {
        "usage": {"prompt_tokens": 6, "completion_tokens": 1},
        "timings": {"queue_ms": 0.0, "load_ms": 0.0, "ttft_ms": 1.1, "total_ms": 1.1},
    }
    fake.route("POST", "/infer", stream_reply([*token_events("Paris"), one]))
    run = run_cli([*sock_args, "infer", "x"], Terminal(stdout_tty=True, stderr_tty=True))
    stats = plain(run.stderr).strip().splitlines()[-1]
    assert stats == "1 token · first token 1 ms · stopped at max tokens · tiny.gguf"


def test_the_stats_line_breaks_between_figures_at_80_columns(
    fake: FakeDaemon, sock_args: list[str]
) -> None:
    slow = DONE | {
        "model": "smollm2-360m-instruct-q8_0.gguf",
        "usage": {"prompt_tokens": 6, "completion_tokens": 128},
        "timings": {"queue_ms": 3000.0, "load_ms": 1200.0, "ttft_ms": 4300.0, "total_ms": 6840},
    }
    fake.route("POST", "/infer", stream_reply([*token_events("x"), slow]))
    term = Terminal(stdout_tty=True, stderr_tty=True, width=80)
    run = run_cli([*sock_args, "infer", "x"], term)
    lines = plain(run.stderr).strip().splitlines()[-2:]
    assert lines == [
        "128 tokens · 50.0 tokens/s · first token 4.3 s · load 1.2 s · queued 3.0 s",
        "stopped at max tokens · smollm2-360m-instruct-q8_0.gguf",
    ]
