"""`modelctl` against the real modeld: in a real pseudo-terminal (pexpect) and through pipes.

Two daemons serve tiny random llama models (thousands of tokens/s): `daemon`, shared by
every test that leaves it idle, and `busy_daemon` with `--max-queue-depth 0`, where one
held stream makes the next request a 429. A long stream is a greedy request for
LONG_TOKENS tokens, which runs for seconds, so Ctrl-C and a held stream always land
mid-generation. The terminal tests strip the ANSI codes and read what a person would see.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import pexpect
import pytest

from tests.conftest import ModelStore
from tests.helpers.daemon import Daemon, free_port

REPO = Path(__file__).resolve().parents[2]  # children run here, so they import this checkout
MODEL = "tiny-a.gguf"  # the model most tests use
COLD_MODEL = "tiny-b.gguf"  # loaded by one test only, so its first request waits for a load
DAEMON_ARGS = ("--threads", "1", "--n-ctx", "8192")  # 1 thread: 2 cores; ctx: long streams
LONG_TOKENS = 8000  # a greedy stream this long runs for seconds, fits n_ctx with the prompt
SHORT_TOKENS = 24  # a whole generation in milliseconds
ROWS, COLS = 40, 120  # the pseudo-terminal's size: the status screen fits without wrapping
EXPECT_TIMEOUT_S = 20.0  # pexpect waits: generous for a loaded 2-core box; passes take ms
RUN_TIMEOUT_S = 30.0  # the same for a piped `modelctl` run
IDLE_LIMIT_S = 1.0  # Ctrl-C must leave the instance idle (inflight 0) within this
POLL_S = 0.005  # how often /status is polled while timing the cancellation
WATCH_INTERVAL = "0.2"  # `status --watch` refresh: several redraws in a second
GREEDY = ("--temperature", "0", "--seed", "1")  # reproducible text, for comparisons
CURSOR_HIDDEN, CURSOR_SHOWN = "\x1b[?25l", "\x1b[?25h"  # a spinner hides it while it spins
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")  # CSI sequences: colours, cursor moves
STATS = re.compile(
    r"^(?P<tokens>\d+) tokens · (?P<rate>[\d.]+) tokens/s · first token (?P<ttft>[\d.]+ m?s)"
    r"(?: · load (?P<load>[\d.]+ m?s))?(?: · queued [\d.]+ m?s)?"
    r" · stopped at max tokens · (?P<model>\S+)$",
    re.MULTILINE,
)  # the dim line after a generation (docs/modelctl.md)
HINT = "hint: start it with `modeld`, or `systemctl --user start modeld.socket`"
CHILD_ENV_DROP = ("MODELCTL_SOCKET", "MODELCTL_URL", "NO_COLOR", "FORCE_COLOR", "COLUMNS", "LINES")


# ---- daemons -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models_dir(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("modelctl-models")
    return model_store.models_dir(dest, {MODEL: "tiny", COLD_MODEL: "tiny2"})


@contextmanager
def running(daemon: Daemon) -> Iterator[Daemon]:
    """Run a daemon for the module; it must stop cleanly, or its log is shown."""
    daemon.start()
    try:
        yield daemon
    finally:
        code = daemon.stop()
    assert code == 0, f"modeld exited with {code}:\n{daemon.log()[-4000:]}"


@pytest.fixture(scope="module")
def daemon(models_dir: Path) -> Iterator[Daemon]:
    with running(Daemon(models_dir, *DAEMON_ARGS)) as d:
        yield d


@pytest.fixture(scope="module")
def busy_daemon(models_dir: Path) -> Iterator[Daemon]:
    """A daemon where a second request for a busy model gets 429 queue_full at once."""
    with running(Daemon(models_dir, *DAEMON_ARGS, "--max-queue-depth", "0")) as d:
        yield d


def body(prompt: str = "Hello", max_tokens: int = SHORT_TOKENS, **extra: Any) -> dict[str, Any]:
    """A greedy, seeded /infer request, as GREEDY makes modelctl send it."""
    return {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": 1,
        **extra,
    }


def daemon_text(
    daemon: Daemon, prompt: str, max_tokens: int = SHORT_TOKENS, model: str = MODEL
) -> str:
    """The text the daemon generates for a greedy request, asked without modelctl."""
    response = daemon.client().infer(**body(prompt, max_tokens, model=model, stream=False))
    assert response.status == 200, response.body
    return str(response.json()["text"])


@contextmanager
def held_stream(daemon: Daemon, model: str = MODEL) -> Iterator[None]:
    """A long generation running on model until the block ends (then it is cancelled)."""
    events = cast(
        Generator[dict[str, Any], None, None],
        daemon.client().stream(body(max_tokens=LONG_TOKENS, model=model)),
    )
    try:
        first = next(events)
        assert first["type"] == "token", first
        yield
    finally:
        events.close()  # drops the connection: the daemon cancels the generation
    wait_until(daemon, "inflight", 0, model)


def instance_field(daemon: Daemon, field: str, model: str = MODEL) -> int:
    """A counter of model's /status entry (0 while it has no instance)."""
    inst = daemon.instance(model)
    return int(inst[field]) if inst else 0


def wait_until(
    daemon: Daemon, field: str, value: int, model: str = MODEL, timeout: float = EXPECT_TIMEOUT_S
) -> float:
    """Poll /status until model's `field` is value; the seconds that took."""
    start = time.monotonic()
    while instance_field(daemon, field, model) != value:
        if time.monotonic() - start > timeout:
            raise AssertionError(
                f"{model} {field} not {value} after {timeout} s:\n{daemon.log()[-4000:]}"
            )
        time.sleep(POLL_S)
    return time.monotonic() - start


def log_requests(daemon: Daemon, path: str = "/infer") -> list[dict[str, Any]]:
    """The daemon's JSON request-log records for path, oldest first."""
    records = []
    for line in daemon.log().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and (record.get("event"), record.get("path")) == (
            "request",
            path,
        ):
            records.append(record)
    return records


# ---- running modelctl --------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """The environment of a `modelctl` child: no endpoint variables, a colour terminal."""
    env = {k: v for k, v in os.environ.items() if k not in CHILD_ENV_DROP}
    env["TERM"] = "xterm-256color"
    return env


def argv(socket_path: str, *args: str) -> list[str]:
    """`modelctl --socket PATH ARGS…` as the arguments of sys.executable."""
    return ["-m", "modelctl", "--socket", socket_path, *args]


def spawn(daemon: Daemon, *args: str) -> Any:
    """`modelctl` in a fresh pseudo-terminal of ROWS x COLS (stdin, stdout, stderr)."""
    return pexpect.spawn(
        sys.executable,
        argv(daemon.socket_path, *args),
        cwd=str(REPO),
        env=child_env(),
        dimensions=(ROWS, COLS),
        encoding="utf-8",
        codec_errors="replace",
        timeout=EXPECT_TIMEOUT_S,
    )


def screen(raw: str) -> str:
    """Roughly what a terminal shows: no escape codes, `\\n` line ends, and of a line
    rewritten after a carriage return only its last version (cleared lines stay)."""
    lines = ANSI.sub("", raw).replace("\r\n", "\n").split("\n")
    return "\n".join(line.rsplit("\r", 1)[-1] for line in lines)


def expect_text(child: Any) -> None:
    """Wait until generated text streams in (after the spinner is gone)."""
    child.expect_exact(CURSOR_SHOWN)
    child.expect(r"\w+ \w+ \w+")


def finish(child: Any) -> tuple[int, str]:
    """Read to the end; the exit status and everything the terminal received."""
    child.expect(pexpect.EOF)
    child.close()
    assert child.signalstatus is None, f"killed by signal {child.signalstatus}"
    return int(child.exitstatus), str(child.before)


def run(socket_path: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """`modelctl` with pipes for stdin, stdout and stderr."""
    return subprocess.run(
        [sys.executable, *argv(socket_path, *args)],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        cwd=REPO,
        env=child_env(),
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


def events_of(stdout: str) -> list[dict[str, Any]]:
    """`--json` output, parsed line by line (every line must be one JSON object)."""
    assert stdout.endswith("\n"), stdout[-200:]
    events = [json.loads(line) for line in stdout.splitlines()]
    assert all(isinstance(e, dict) for e in events)
    return events


# ---- in a terminal -----------------------------------------------------------------------


def test_infer_on_a_tty_waits_behind_a_spinner_streams_and_prints_stats(daemon: Daemon) -> None:
    child = spawn(daemon, "infer", "-m", "tiny-b", *GREEDY, "--max-tokens", str(SHORT_TOKENS), "Hi")
    code, raw = finish(child)
    out = screen(raw)
    assert code == 0, out
    stats = STATS.search(out)
    assert stats, out
    assert stats["tokens"] == str(SHORT_TOKENS) and stats["model"] == COLD_MODEL
    assert float(stats["rate"]) > 0
    assert re.search(r"\x1b\[2m\d+ tokens · ", raw), "the stats line is dim"
    assert stats["load"], f"the first request for {COLD_MODEL} should load it: {out}"
    assert "waiting for tiny-b" in out, "the spinner (erased once the text comes)"
    assert raw.rfind(CURSOR_SHOWN) > raw.rfind(CURSOR_HIDDEN), "the cursor is shown again"
    text = out[out.rindex("\n", 0, stats.start() - 1) + 1 : stats.start()]
    assert text == daemon_text(daemon, "Hi", model=COLD_MODEL) + "\n"


def test_on_a_tty_the_text_goes_to_stdout_and_the_stats_line_to_stderr(
    daemon: Daemon, tmp_path: Path
) -> None:
    err_file = tmp_path / "stderr"
    command = shlex.join(
        [sys.executable, *argv(daemon.socket_path, "infer", "-m", "tiny-a", *GREEDY, "Hello")]
    )
    child = pexpect.spawn(
        "/bin/sh",
        ["-c", f"exec {command} --max-tokens {SHORT_TOKENS} 2>{err_file}"],
        cwd=str(REPO),
        env=child_env(),
        dimensions=(ROWS, COLS),
        encoding="utf-8",
        timeout=EXPECT_TIMEOUT_S,
    )
    code, raw = finish(child)
    err = err_file.read_text()
    assert code == 0, err
    assert screen(raw) == daemon_text(daemon, "Hello") + "\n"
    assert STATS.fullmatch(err.rstrip("\n")), err  # stderr is a file here: no colours


def test_ctrl_c_mid_stream_exits_130_and_the_instance_goes_idle(daemon: Daemon) -> None:
    cancelled_before = daemon.status()["cancelled"]
    child = spawn(daemon, "infer", "-m", "tiny-a", *GREEDY, "--max-tokens", str(LONG_TOKENS), "Hi")
    expect_text(child)
    assert instance_field(daemon, "inflight") == 1
    child.send("\x03")
    sent = time.monotonic()
    idle_after = wait_until(daemon, "inflight", 0, timeout=5.0)
    code, raw = finish(child)
    exited_after = time.monotonic() - sent
    print(
        f"Ctrl-C -> instance idle in {idle_after * 1000:.0f} ms, modelctl gone within "
        f"{exited_after * 1000:.0f} ms"
    )
    assert code == 130
    assert idle_after < IDLE_LIMIT_S, f"still generating {idle_after:.2f} s after Ctrl-C"
    assert "tokens/s" not in screen(raw), "no stats line after an interrupt"
    assert daemon.status()["cancelled"] == cancelled_before + 1
    last = log_requests(daemon)[-1]
    assert last["outcome"] == "client_gone" and last["tokens"] < LONG_TOKENS, last


def test_ctrl_c_while_queued_exits_130_and_leaves_the_queue(daemon: Daemon) -> None:
    with held_stream(daemon):
        child = spawn(daemon, "infer", "-m", "tiny-a", "Hi")
        child.expect_exact("waiting for tiny-a")  # the spinner, while the request is queued
        wait_until(daemon, "queue_depth", 1)
        child.send("\x03")
        code, raw = finish(child)
        assert code == 130
        assert raw.rfind(CURSOR_SHOWN) > raw.rfind(CURSOR_HIDDEN), "the cursor is shown again"
        assert wait_until(daemon, "queue_depth", 0, timeout=5.0) < IDLE_LIMIT_S


def test_status_watch_redraws_until_ctrl_c(daemon: Daemon) -> None:
    child = spawn(daemon, "status", "--watch", "--interval", WATCH_INTERVAL)
    header = f"modeld status · every {WATCH_INTERVAL}s"
    child.expect_exact(header)
    child.expect_exact("in flight 0")
    child.expect_exact(header)  # a second refresh
    child.expect_exact("in flight 0")
    with held_stream(daemon):
        child.expect_exact("in flight 1")  # a redraw shows the new state
    child.expect_exact("in flight 0")
    child.send("\x03")
    code, raw = finish(child)
    assert code == 0
    assert "Traceback" not in raw


def test_status_watch_shows_a_daemon_going_away_and_coming_back(models_dir: Path) -> None:
    with running(Daemon(models_dir, *DAEMON_ARGS)) as first:
        child = spawn(first, "status", "--watch", "--interval", WATCH_INTERVAL)
        child.expect_exact("in flight 0")
    child.expect(rf"cannot reach modeld at unix socket {re.escape(first.socket_path)}: ")
    assert child.isalive(), "the watch keeps trying"
    second = Daemon(models_dir, *DAEMON_ARGS)
    second.socket_path = first.socket_path  # a restart: the same socket, a new process
    with running(second):
        child.expect_exact("in flight 0")
        child.send("\x03")
        code, _ = finish(child)
    assert code == 0


def test_an_error_event_mid_stream_ends_the_line_and_exits_1(models_dir: Path) -> None:
    stopping = Daemon(models_dir, *DAEMON_ARGS, "--shutdown-grace-s", "0.2").start()
    try:
        child = spawn(stopping, "infer", "-m", "tiny-a", "--max-tokens", str(LONG_TOKENS), "Hi")
        expect_text(child)
        assert stopping.proc is not None
        stopping.proc.send_signal(signal.SIGTERM)  # the stream outlives the grace: error event
        code, raw = finish(child)
        assert stopping.proc.wait(EXPECT_TIMEOUT_S) == 0, stopping.log()[-4000:]
    finally:
        stopping.stop()
    assert code == 1
    assert re.search(r"[^\n]\nerror: modeld is shutting down \(shutting_down\)\n$", screen(raw)), (
        raw
    )


def test_models_on_a_tty(daemon: Daemon) -> None:
    code, raw = finish(spawn(daemon, "models"))
    out = screen(raw)
    assert code == 0, out
    assert re.search(r"^ID\s+SIZE\s+EST VRAM\s+VRAM\s+STATE\s*$", out, re.MULTILINE), out
    row = r"^{}\s+[\d.]+ kB\s+\d+ MB\s+(\d+ MB|-)\s+(ready|unloaded)\s*$"
    for model in (MODEL, COLD_MODEL):
        assert re.search(row.format(re.escape(model)), out, re.MULTILINE), out


def test_health_on_a_tty(daemon: Daemon) -> None:
    daemon_text(daemon, "Hello", max_tokens=1)  # an instance is ready: the daemon is ready
    code, raw = finish(spawn(daemon, "health"))
    assert code == 0, raw
    assert screen(raw) == f"modeld live, ready  at unix socket {daemon.socket_path}\n"


# ---- through pipes -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def json_run(daemon: Daemon) -> subprocess.CompletedProcess[str]:
    """`modelctl infer --json` for the greedy request of the pipe tests."""
    return run(daemon.socket_path, "infer", "-m", "tiny-a", *GREEDY, "--json", "The capital")


@pytest.mark.parametrize("mode", [[], ["--no-stream"]], ids=["stream", "no-stream"])
def test_infer_into_cat_carries_only_the_text(
    daemon: Daemon, json_run: subprocess.CompletedProcess[str], mode: list[str]
) -> None:
    args = argv(daemon.socket_path, "infer", "-m", "tiny-a", *GREEDY, *mode, "The capital")
    producer = subprocess.Popen(
        [sys.executable, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env=child_env(),
    )
    assert producer.stdout is not None and producer.stderr is not None
    cat = subprocess.run(["cat"], stdin=producer.stdout, capture_output=True, check=False)
    producer.stdout.close()
    err = producer.stderr.read()
    producer.stderr.close()
    assert producer.wait(RUN_TIMEOUT_S) == 0, err
    assert err == b"", "no spinner, no stats line, nothing on stderr in a pipe"
    text = "".join(e["text"] for e in events_of(json_run.stdout) if e["type"] == "token")
    assert text and not text.endswith("\n")
    assert cat.stdout.decode() == text + "\n"


def test_json_lines_are_the_daemons_events(
    daemon: Daemon, json_run: subprocess.CompletedProcess[str]
) -> None:
    assert json_run.returncode == 0, json_run.stderr
    assert json_run.stderr == ""
    *tokens, done = events_of(json_run.stdout)
    assert tokens and all(set(e) == {"type", "text"} and e["type"] == "token" for e in tokens)
    assert done["type"] == "done" and done["model"] == MODEL
    assert done["usage"]["completion_tokens"] == len(tokens)
    assert set(done["timings"]) >= {"queue_ms", "load_ms", "ttft_ms", "total_ms"}
    # Byte for byte as the daemon sends them (timings differ between two requests).
    direct = daemon.client().infer(
        **body("The capital", max_tokens=done["usage"]["completion_tokens"])
    )
    direct_lines = direct.body.decode().splitlines()
    assert json_run.stdout.splitlines()[:-1] == direct_lines[:-1]
    assert {k: v for k, v in done.items() if k != "timings"} == {
        k: v for k, v in json.loads(direct_lines[-1]).items() if k != "timings"
    }


@pytest.mark.parametrize("dash", [[], ["-"]], ids=["piped", "dash"])
def test_prompt_from_stdin(daemon: Daemon, dash: list[str]) -> None:
    # `echo "Hello there" | modelctl infer -m tiny-a`: the newline is part of the prompt.
    result = run(
        daemon.socket_path,
        "infer",
        "-m",
        "tiny-a",
        *GREEDY,
        "--max-tokens",
        str(SHORT_TOKENS),
        *dash,
        stdin="Hello there\n",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == daemon_text(daemon, "Hello there\n") + "\n"


def test_a_reader_that_goes_away_cancels_the_generation(daemon: Daemon) -> None:
    command = shlex.join(
        [sys.executable, *argv(daemon.socket_path, "infer", "-m", "tiny-a", *GREEDY, "Hi")]
    )
    result = subprocess.run(
        ["/bin/bash", "-c", f"set -o pipefail; {command} --max-tokens {LONG_TOKENS} | head -c 20"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=child_env(),
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert len(result.stdout) == 20
    assert result.returncode == 141, result.stderr  # ExitCode.BROKEN_PIPE: 128 + SIGPIPE
    assert result.stderr == "", "no traceback, no message: the reader chose to stop"
    assert wait_until(daemon, "inflight", 0, timeout=5.0) < IDLE_LIMIT_S
    last = log_requests(daemon)[-1]
    assert last["outcome"] == "client_gone" and last["tokens"] < LONG_TOKENS, last


def test_status_json_watch_prints_one_document_per_line(daemon: Daemon) -> None:
    proc = subprocess.Popen(
        [sys.executable, *argv(daemon.socket_path, "status", "--json", "-w", "--interval", "0.1")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=child_env(),
    )
    try:
        assert proc.stdout is not None
        documents = [json.loads(proc.stdout.readline()) for _ in range(3)]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert all({"vram", "inflight", "instances"} <= set(d) for d in documents), documents


def test_unknown_model_exits_3(daemon: Daemon) -> None:
    result = run(daemon.socket_path, "infer", "-m", "no-such-model", "Hello")
    assert result.returncode == 3, result.stderr
    assert result.stdout == ""
    assert re.fullmatch(r"error: .*no-such-model.* \(model_not_found\)\n", result.stderr)


def test_a_full_queue_exits_4(busy_daemon: Daemon) -> None:
    with held_stream(busy_daemon):
        result = run(busy_daemon.socket_path, "infer", "-m", "tiny-a", "Hello")
    assert result.returncode == 4, result.stderr
    assert result.stdout == ""
    assert re.fullmatch(r"error: .+ \(queue_full\)\n", result.stderr), result.stderr


def test_retry_waits_out_a_full_queue(busy_daemon: Daemon) -> None:
    args = argv(busy_daemon.socket_path, "infer", "-m", "tiny-a", *GREEDY, "--retry", "3", "Hi")
    args += ["--max-tokens", str(SHORT_TOKENS)]
    with held_stream(busy_daemon):
        proc = subprocess.Popen(
            [sys.executable, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=child_env(),
        )
        assert proc.stderr is not None
        notice = proc.stderr.readline()  # the 429 came while the held stream runs
    out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert re.fullmatch(
        r"daemon busy \(queue_full\): retrying in \d+s \(retry 1 of 3\)\n", notice
    ), notice
    assert proc.returncode == 0, err
    assert out == daemon_text(busy_daemon, "Hi") + "\n"


@pytest.mark.parametrize("where", ["no-file", "stale-socket", "closed-port"])
def test_an_unreachable_daemon_exits_5_with_a_hint(tmp_path: Path, where: str) -> None:
    if where == "closed-port":
        port = free_port()
        args, tried = ["--url", f"http://127.0.0.1:{port}"], f"http://127.0.0.1:{port}"
    else:
        path = tmp_path / "gone.sock"
        if where == "stale-socket":
            with socket.socket(socket.AF_UNIX) as stale:
                stale.bind(str(path))  # the file stays; nothing listens on it
        args, tried = ["--socket", str(path)], f"unix socket {path}"
    result = subprocess.run(
        [sys.executable, "-m", "modelctl", *args, "infer", "-m", "tiny-a", "Hello"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=child_env(),
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 5, result.stderr
    assert result.stdout == ""
    first, hint = result.stderr.splitlines()
    assert first.startswith(f"error: cannot reach modeld at {tried}: "), first
    assert hint.startswith(HINT), hint


@pytest.mark.parametrize(
    "command", [["models"], ["health"], ["status", "--watch"]], ids=["models", "health", "watch"]
)
def test_every_command_exits_5_when_no_daemon_runs(tmp_path: Path, command: list[str]) -> None:
    result = run(str(tmp_path / "absent.sock"), *command)
    assert result.returncode == 5, result.stderr
    assert result.stdout == ""
    assert f"cannot reach modeld at unix socket {tmp_path / 'absent.sock'}" in result.stderr
    assert HINT in result.stderr


def test_infer_over_tcp_with_modelctl_url(daemon: Daemon) -> None:
    env = {**child_env(), "MODELCTL_URL": f"http://localhost:{daemon.port}"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelctl",
            "infer",
            "-m",
            "tiny-a",
            *GREEDY,
            "Hello",
            "--max-tokens",
            str(SHORT_TOKENS),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == daemon_text(daemon, "Hello") + "\n"
