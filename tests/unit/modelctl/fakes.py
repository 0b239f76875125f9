"""Test helpers: a scriptable fake modeld on a temp Unix socket and on 127.0.0.1.

Each route answers with a list of `Reply`s in turn (the last one repeats). A reply is a
whole JSON body or a chunked ndjson stream; a stream may go on "forever" (until the client
hangs up, which sets `disconnected`), as a long generation would.
"""

from __future__ import annotations

import io
import itertools
import json
import re
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from modelctl.cli import cli
from modelctl.render import Environment

STREAM_FOREVER = -1  # `Reply.repeat_last` value: send the last line until the client leaves


@dataclass
class Reply:
    """One scripted answer."""

    status: int = 200
    body: bytes | None = None  # a whole body (Content-Length)
    chunks: list[bytes] | None = None  # a chunked body, one chunk each
    headers: list[tuple[str, str]] = field(default_factory=list)
    delay_s: float = 0.0  # before each chunk (and before the head of a whole body)
    head_delay_s: float = 0.0  # before the head: the request waits (queue, load, prompt)
    repeat_last: int = 0  # send the last chunk this many more times (STREAM_FOREVER: no end)
    close_early: bool = False  # hang up after the chunks without ending the body


def json_reply(obj: Any, status: int = 200, headers: list[tuple[str, str]] | None = None) -> Reply:
    return Reply(status=status, body=json.dumps(obj).encode(), headers=headers or [])


def error_reply(status: int, code: str, message: str, **extra: Any) -> Reply:
    headers = []
    if status == 429:
        headers.append(("Retry-After", str(max(1, extra.get("retry_after_ms", 1000) // 1000))))
    return json_reply({"error": {"code": code, "message": message, **extra}}, status, headers)


def stream_reply(events: list[dict[str, Any]], **kwargs: Any) -> Reply:
    lines = [json.dumps(e).encode() + b"\n" for e in events]
    return Reply(chunks=lines, headers=[("Content-Type", "application/x-ndjson")], **kwargs)


DONE = {
    "type": "done",
    "model": "tiny.gguf",
    "finish_reason": "length",
    "usage": {"prompt_tokens": 6, "completion_tokens": 3},
    "timings": {"queue_ms": 0.1, "load_ms": 0.0, "ttft_ms": 20.0, "total_ms": 60.0},
}


def token_events(*texts: str) -> list[dict[str, Any]]:
    return [{"type": "token", "text": t} for t in texts]


# A /models answer: one model never loaded, one whose load failed.
MODELS = {
    "models": [
        {
            "id": "smollm2.gguf",
            "name": "smollm2.gguf",
            "path": "/m/smollm2.gguf",
            "size_bytes": 98_000_000,
            "est_vram_mb": 612,
            "vram_mb": None,
            "state": "unloaded",
            "error": None,
        },
        {
            "id": "broken.gguf",
            "size_bytes": 1_500_000_000,
            "est_vram_mb": 2100,
            "vram_mb": 2050,
            "state": "error",
            "error": "bad magic",
        },
    ]
}

# A /status answer with one pinned, busy instance.
STATUS = {
    "vram": {
        "budget_mb": 24000,
        "margin_mb": 512,
        "used_mb": 612,
        "available_mb": 22876,
        "source": "config",
    },
    "inflight": 1,
    "max_inflight": 0,
    "rejected": {"queue_full": 2, "queue_timeout": 0, "overloaded": 0},
    "cancelled": 3,
    "instances": [
        {
            "model_id": "smollm2.gguf",
            "state": "ready",
            "last_used": 1764355200.5,
            "est_vram_mb": 612,
            "vram_mb": 598,
            "inflight": 1,
            "queue_depth": 4,
            "oldest_wait_ms": 0,
            "loads": 1,
            "pinned": True,
            "error": None,
        }
    ],
}


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # terminal control sequences, to read text


def plain(text: str) -> str:
    """Text as a person reads it off the terminal: control sequences removed."""
    return ANSI.sub("", text)


@dataclass
class Seen:
    """A request as the fake daemon received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class FakeDaemon:
    """Routes, recorded requests, and a flag for a client that hung up mid-stream."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], list[Reply]] = {}
        self.requests: list[Seen] = []
        self.disconnected = threading.Event()
        self.streaming = threading.Event()  # set once a stream's first chunk went out
        self.socket_path = Path()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def route(self, method: str, path: str, *replies: Reply) -> None:
        self.routes[(method, path)] = list(replies)

    def next_reply(self, method: str, path: str) -> Reply:
        replies = self.routes.get((method, path))
        if not replies:
            return error_reply(404, "not_found", f"no route {method} {path}")
        return replies.pop(0) if len(replies) > 1 else replies[0]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet; a Unix peer has no address to log anyway

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def _answer(self) -> None:
        fake: FakeDaemon = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        fake.requests.append(Seen(self.command, self.path, headers, body))
        reply = fake.next_reply(self.command, self.path)
        try:
            self._send(fake, reply)
        except (BrokenPipeError, ConnectionResetError):
            fake.disconnected.set()
        self.close_connection = True

    def _send(self, fake: FakeDaemon, reply: Reply) -> None:
        time.sleep(reply.head_delay_s)
        self.send_response(reply.status)
        for name, value in reply.headers:
            self.send_header(name, value)
        if reply.chunks is None:
            time.sleep(reply.delay_s)
            body = reply.body or b""
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        for chunk in _chunks(reply):
            time.sleep(reply.delay_s)
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()
            fake.streaming.set()
        if reply.close_early:
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(b"0\r\n\r\n")


def _chunks(reply: Reply) -> Iterator[bytes]:
    chunks = reply.chunks or []
    yield from chunks
    if chunks and reply.repeat_last:
        more = (
            itertools.count() if reply.repeat_last == STREAM_FOREVER else range(reply.repeat_last)
        )
        for _ in more:
            yield chunks[-1]


class _UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    fake: FakeDaemon


class _TcpServer(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeDaemon


def serve(fake: FakeDaemon, directory: Path) -> list[socketserver.BaseServer]:
    """Start serving `fake` on DIRECTORY/modeld.sock and an ephemeral loopback port."""
    fake.socket_path = directory / "modeld.sock"
    unix = _UnixServer(str(fake.socket_path), _Handler)
    tcp = _TcpServer(("127.0.0.1", 0), _Handler)
    unix.fake = tcp.fake = fake
    fake.port = tcp.server_address[1]
    for server in (unix, tcp):
        kwargs = {"poll_interval": 0.01}
        threading.Thread(target=server.serve_forever, kwargs=kwargs, daemon=True).start()
    return [unix, tcp]


@dataclass
class Run:
    """What one CLI run printed and returned."""

    exit_code: int
    stdout: str
    stderr: str
    result: Result


class ClosingPipe(io.StringIO):
    """A stdout whose reader goes away (`| head -c LIMIT`): writes past `limit` characters
    fail with BrokenPipeError, as a pipe's do once its read end is closed."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def write(self, text: str) -> int:
        room = self.limit - self.tell()
        if len(text) > room:
            super().write(text[: max(0, room)])
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(text)


@dataclass
class Terminal:
    """Options for a run: which streams are terminals, what stdin holds, a fake sleep."""

    stdin: str = ""
    stdin_tty: bool = False
    stdout_tty: bool = False
    stderr_tty: bool = False
    width: int = 100  # the terminal's columns (and a pipe's, in these tests)
    stdout_limit: int | None = None  # the reader of stdout leaves after this many characters
    sleeps: list[float] = field(default_factory=list)
    max_sleeps: int | None = None  # raise KeyboardInterrupt at this many sleeps (for --watch)
    now: float = 1_764_355_260.0  # the wall clock: a minute after the fixtures' last_used

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.max_sleeps is not None and len(self.sleeps) >= self.max_sleeps:
            raise KeyboardInterrupt


def run_cli(
    args: list[str], term: Terminal | None = None, env: dict[str, str] | None = None
) -> Run:
    """Run `modelctl ARGS` in-process over string buffers standing for the streams."""
    term = term or Terminal()
    stdout = io.StringIO() if term.stdout_limit is None else ClosingPipe(term.stdout_limit)
    stderr = io.StringIO()
    environment = Environment(
        stdin=io.StringIO(term.stdin),
        stdout=stdout,
        stderr=stderr,
        stdin_isatty=term.stdin_tty,
        stdout_isatty=term.stdout_tty,
        stderr_isatty=term.stderr_tty,
        width=term.width,
        sleep=term.sleep,
        wall_clock=lambda: term.now,
    )
    runner = CliRunner()
    env = {"MODELCTL_SOCKET": None, "MODELCTL_URL": None, **(env or {})}  # type: ignore[dict-item]
    result = runner.invoke(cli, args, obj=environment, env=env, catch_exceptions=False)
    # click's own messages (usage errors) go to the runner's streams; ours to the buffers.
    return Run(
        result.exit_code,
        stdout.getvalue() + result.stdout,
        stderr.getvalue() + result.stderr,
        result,
    )
