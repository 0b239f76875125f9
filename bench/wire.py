"""A minimal blocking HTTP/1.1 client that timestamps every chunk it reads.

The bench measures time to the first token as seen by a client, so the client must add as
little as possible and record when bytes arrive, not when a library hands them over.
`Conn` speaks just enough HTTP/1.1 for the servers under test: one request at a time on a
keep-alive connection, bodies framed by Content-Length, chunked encoding or close.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

RECV_BYTES = 65536  # one read; token events are tens of bytes, so one read holds many
MAX_HEAD_BYTES = 65536  # a response head longer than this is a broken server
DEFAULT_TIMEOUT_S = 120.0  # the slowest single request in the bench (a cold load) is seconds


class WireError(RuntimeError):
    """The server sent something this client does not understand, or closed early."""


@dataclass(frozen=True)
class Endpoint:
    """Where a server listens: a Unix socket path, or a loopback TCP port."""

    unix: str | None = None
    port: int | None = None

    def describe(self) -> str:
        """A short label for reports."""
        return f"unix:{self.unix}" if self.unix else f"127.0.0.1:{self.port}"

    def connect(self, timeout: float = DEFAULT_TIMEOUT_S) -> socket.socket:
        """Open a connected socket (TCP_NODELAY on TCP)."""
        if self.unix is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(self.unix)
            return sock
        sock = socket.create_connection(("127.0.0.1", self.port or 0), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


@dataclass(frozen=True)
class Head:
    """A response's status and headers (names lower-cased)."""

    status: int
    headers: dict[str, str]


def encode_request(
    method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> bytes:
    """The bytes of one request; a non-bytes body is sent as JSON."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost"]
    hdrs = dict(headers or {})
    if data is not None:
        hdrs.setdefault("Content-Type", "application/json")
        hdrs["Content-Length"] = str(len(data))
    lines += [f"{k}: {v}" for k, v in hdrs.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (data or b"")


class Conn:
    """One keep-alive connection; `request` returns the head, `body` yields timed chunks."""

    def __init__(self, endpoint: Endpoint, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.sock = endpoint.connect(timeout)
        self._buf = b""
        self._closed = False

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recv(self) -> bool:
        """Read once into the buffer; False at end of stream."""
        data = self.sock.recv(RECV_BYTES)
        if not data:
            self._closed = True
            return False
        self._buf += data
        return True

    def send(self, data: bytes) -> float:
        """Send raw request bytes; return the perf_counter time just before sending."""
        t = time.perf_counter()
        self.sock.sendall(data)
        return t

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[float, Head]:
        """Send a request and read its head; return (send time, head)."""
        t = self.send(encode_request(method, path, body, headers))
        return t, self.read_head()

    def read_head(self) -> Head:
        """Read the status line and headers of the next response."""
        while b"\r\n\r\n" not in self._buf:
            if len(self._buf) > MAX_HEAD_BYTES or not self._recv():
                raise WireError("connection closed before a response head")
        raw, self._buf = self._buf.split(b"\r\n\r\n", 1)
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/"):
            raise WireError(f"bad status line {lines[0]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return Head(int(parts[1]), headers)

    def body(self, head: Head) -> Iterator[tuple[float, bytes]]:
        """Yield (arrival time, bytes) pieces of the body until it ends."""
        if head.headers.get("transfer-encoding", "").lower() == "chunked":
            yield from self._chunked()
        elif "content-length" in head.headers:
            yield from self._sized(int(head.headers["content-length"]))
        else:
            yield from self._until_close()

    def read_body(self, head: Head) -> bytes:
        """The whole body at once."""
        return b"".join(piece for _, piece in self.body(head))

    def _sized(self, n: int) -> Iterator[tuple[float, bytes]]:
        while n > 0:
            if not self._buf and not self._recv():
                raise WireError("connection closed inside a body")
            piece, self._buf = self._buf[:n], self._buf[n:]
            n -= len(piece)
            yield time.perf_counter(), piece

    def _until_close(self) -> Iterator[tuple[float, bytes]]:
        while True:
            if self._buf:
                piece, self._buf = self._buf, b""
                yield time.perf_counter(), piece
            if self._closed or not self._recv():
                return

    def _chunked(self) -> Iterator[tuple[float, bytes]]:
        """Decode chunked framing; each yielded piece is what one read made available."""
        while True:
            while b"\r\n" not in self._buf:
                if not self._recv():
                    raise WireError("connection closed inside a chunked body")
            size_line, self._buf = self._buf.split(b"\r\n", 1)
            size = int(size_line.split(b";", 1)[0], 16)
            if size == 0:
                while b"\r\n" not in self._buf:  # no trailers are expected: just the CRLF
                    if not self._recv():
                        return
                self._buf = self._buf.split(b"\r\n", 1)[1]
                return
            got = b""
            while len(got) < size:
                if not self._buf and not self._recv():
                    raise WireError("connection closed inside a chunk")
                take = size - len(got)
                got, self._buf = got + self._buf[:take], self._buf[take:]
            while len(self._buf) < 2:
                if not self._recv():
                    raise WireError("connection closed after a chunk")
            self._buf = self._buf[2:]
            yield time.perf_counter(), got


def lines(pieces: Iterator[tuple[float, bytes]]) -> Iterator[tuple[float, bytes]]:
    """Split timed body pieces into timed lines (without the newline)."""
    pending = b""
    for t, piece in pieces:
        pending += piece
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield t, line
    if pending:
        yield time.perf_counter(), pending


def get_json(endpoint: Endpoint, path: str, timeout: float = 5.0) -> tuple[int, Any]:
    """GET path on a fresh connection; return (status, parsed JSON or None)."""
    with Conn(endpoint, timeout) as conn:
        _, head = conn.request("GET", path)
        body = conn.read_body(head)
    try:
        return head.status, json.loads(body) if body else None
    except ValueError:
        return head.status, None
