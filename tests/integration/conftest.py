"""Shared pieces of the real-daemon integration tests.

Each module starts the real `modeld` (a subprocess, see tests/helpers/daemon.py) with the
options it needs and shares it between tests that leave its state alone. The helpers here
read streams at the test's own pace (`RawInfer`), wait for a condition with a deadline
(`wait_for`) and find the daemon's worker processes through /proc. A daemon's log dir
(/tmp/modeld-*) is removed when it stopped cleanly, unless MODELD_TEST_KEEP_LOGS is set.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.helpers.client import Client
from tests.helpers.daemon import Daemon

T = TypeVar("T")

BASE_ARGS = ("--threads", "1")  # one thread per worker: several workers share 2 cores
WAIT_S = 15.0  # deadline of wait_for: generous for a loaded CI box; healthy cases take ms
POLL_S = 0.01  # how often wait_for looks again
WORKERS_EXIT_S = 5.0  # after modeld exits its workers must be gone within this
KEEP_LOGS_ENV = "MODELD_TEST_KEEP_LOGS"  # set it to keep every daemon's log dir in /tmp
LOG_TAIL_CHARS = 4000  # how much of the daemon log goes into a failure message
LIFECYCLE_EVENTS = ("load", "load_failed", "evict", "unload")  # daemon log events worth quoting


@contextmanager
def running(
    models_dir: Path,
    *args: str,
    wait_ready: bool = False,
    preexec: Callable[[], None] | None = None,
) -> Iterator[Daemon]:
    """Run a daemon for the duration of the block; it must stop cleanly (exit 0)."""
    daemon = Daemon(models_dir, *BASE_ARGS, *args, preexec=preexec)
    daemon.start(wait_ready=wait_ready)
    ok = False
    try:
        yield daemon
        ok = True
    finally:
        workers = worker_pids(daemon) if daemon.proc and daemon.proc.poll() is None else []
        code = daemon.stop()
        left = wait_for_exit(workers)
        ok = ok and not left
        if ok and code == 0 and not os.environ.get(KEEP_LOGS_ENV):
            shutil.rmtree(daemon.tmp, ignore_errors=True)
        else:
            print(f"daemon log kept in {daemon.log_path}")
    assert code == 0, f"modeld exited with {code}\n{log_tail(daemon)}"
    assert not left, f"workers {left} still running after modeld stopped"


def wait_for_exit(pids: list[int], timeout: float = WORKERS_EXIT_S) -> list[int]:
    """Wait until none of pids is running; return those still running at the deadline."""
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    return left


def log_tail(daemon: Daemon, chars: int = LOG_TAIL_CHARS) -> str:
    """The end of the daemon's log, for assertion messages."""
    return daemon.log()[-chars:]


def log_records(daemon: Daemon, field: str, *values: str) -> list[dict[str, Any]]:
    """The daemon's JSON log records whose `field` is one of values."""
    out = []
    for line in daemon.log().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get(field) in values:
            out.append(rec)
    return out


def log_events(daemon: Daemon, *events: str) -> list[dict[str, Any]]:
    """The daemon's JSON log records whose `event` field is one of events."""
    return log_records(daemon, "event", *events)


@pytest.fixture(params=["unix", "tcp"])
def via(request: pytest.FixtureRequest) -> str:
    """Each test that takes `via` runs once over the Unix socket and once over TCP."""
    return str(request.param)


def wait_for(
    pred: Callable[[], T | None], what: str, timeout: float = WAIT_S, interval: float = POLL_S
) -> T:
    """Poll pred until it returns something truthy; fail with `what` after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def instance(daemon: Daemon, model_id: str) -> dict[str, Any]:
    """The /status entry of model_id (an empty dict when it has none yet)."""
    return daemon.instance(model_id) or {}


class RawInfer:
    """A POST /infer sent at once and read later, at the test's pace.

    `http.client` would block in `getresponse()` until the status line, which for a
    queued request only comes when its generation starts; this sends the request on
    its own socket and parses the answer only when asked.
    """

    def __init__(
        self,
        client: Client,
        body: dict[str, Any] | bytes,
        headers: dict[str, str] | None = None,
    ) -> None:
        conn = client.connection()
        conn.connect()
        assert conn.sock is not None
        self.sock: socket.socket = conn.sock
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        lines = [
            "POST /infer HTTP/1.1",
            "Host: localhost",
            "Content-Type: application/json",
            f"Content-Length: {len(data)}",
            *(f"{k}: {v}" for k, v in (headers or {}).items()),
        ]
        self.sent_at = time.monotonic()
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
        self._resp: http.client.HTTPResponse | None = None

    def response(self) -> http.client.HTTPResponse:
        """The response head (blocks until the daemon sends it)."""
        if self._resp is None:
            resp = http.client.HTTPResponse(self.sock, method="POST")
            resp.begin()
            self._resp = resp
        return self._resp

    @property
    def status(self) -> int:
        return self.response().status

    def header(self, name: str) -> str | None:
        return self.response().getheader(name)

    def json(self) -> Any:
        """The whole body as JSON (for error answers and stream: false)."""
        return json.loads(self.response().read())

    def next_event(self) -> dict[str, Any] | None:
        """The next ndjson event, or None at the end of the stream."""
        resp = self.response()
        while True:
            line = resp.readline()
            if not line:
                return None
            if line.strip():
                event = json.loads(line)
                assert isinstance(event, dict)
                return event

    def events(self) -> list[dict[str, Any]]:
        """Every remaining event, to the end of the stream."""
        out = []
        while (event := self.next_event()) is not None:
            out.append(event)
        return out

    def close(self) -> None:
        """Drop the connection (the daemon sees the client go away)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._resp is not None:
            self._resp.close()
        self.sock.close()

    def __enter__(self) -> RawInfer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stream_to_end(client: Client, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Stream one /infer to its end; the events, which must end with exactly one done."""
    events = list(client.stream(body))
    assert_one_done(events)
    return events


def assert_one_done(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Token events, then exactly one terminal event, a `done`; returns it."""
    assert events, "empty stream"
    *tokens, last = events
    assert all(e["type"] == "token" and isinstance(e["text"], str) for e in tokens), events[:5]
    assert last["type"] == "done", last
    return last


# ---- processes ---------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state is [0], ppid [1])."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rpartition(")")[2].split()


def children(pid: int) -> list[int]:
    """Live child processes of pid, found by scanning /proc for their parent."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields and int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry))
    return out


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def worker_pids(daemon: Daemon) -> list[int]:
    """The daemon's `python -m modeld.worker` children (the spare one included)."""
    assert daemon.proc is not None
    return [p for p in children(daemon.proc.pid) if "modeld.worker" in cmdline(p)]


def maps_inode(pid: int, inode: int) -> bool:
    """True when pid has a file with this inode mapped (llama.cpp mmaps the model)."""
    try:
        with open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and fields[4] == str(inode):
                    return True
    except OSError:
        return False
    return False


def worker_for(daemon: Daemon, model_path: Path) -> int:
    """The pid of the worker that has model_path loaded."""
    inode = model_path.stat().st_ino
    pids = [p for p in worker_pids(daemon) if maps_inode(p, inode)]
    assert len(pids) == 1, f"workers mapping {model_path.name}: {pids} of {worker_pids(daemon)}"
    return pids[0]


def alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"
