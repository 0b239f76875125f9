"""Raw-socket helpers for tests that send bytes no well-behaved client would."""

from __future__ import annotations

import json
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers.daemon import Daemon
from tests.integration.conftest import log_tail

READ_TIMEOUT_S = 5.0  # longest a raw read waits for the daemon's answer or close
HOST = b"Host: localhost\r\n"


@dataclass(frozen=True)
class RawResponse:
    """One HTTP response as read off the wire (header names lower-cased)."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def closes(self) -> bool:
        return self.headers.get("connection", "").lower() == "close"


def open_socket(daemon: Daemon, via: str, timeout: float = READ_TIMEOUT_S) -> socket.socket:
    """A connected raw socket to one of the daemon's listeners."""
    if via == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(daemon.socket_path)
        return sock
    return socket.create_connection(("127.0.0.1", daemon.port), timeout=timeout)


def read_to_close(sock: socket.socket, timeout: float = READ_TIMEOUT_S) -> tuple[bytes, bool]:
    """Everything the daemon sends until it closes; (data, True) or (data, False) on timeout."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return data, False
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data, False
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk


def _chunked(data: bytes, pos: int) -> tuple[bytes, int]:
    """Decode a chunked body starting at pos; return it and the offset after it."""
    body = b""
    while True:
        end = data.index(b"\r\n", pos)
        size = int(data[pos:end].split(b";")[0], 16)
        pos = end + 2
        if size == 0:
            return body, data.index(b"\r\n", pos) + 2  # no trailers expected
        body += data[pos : pos + size]
        pos += size + 2


def parse_responses(data: bytes, *, head: bool = False) -> list[RawResponse]:
    """Split bytes read from the daemon into responses; fail on anything malformed.

    `head`: some requests were HEAD, whose answers have a Content-Length but no body; an
    answer followed by nothing or by the next status line is then taken for one of those.
    """
    out: list[RawResponse] = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        assert end >= 0, f"incomplete response head: {data[pos : pos + 200]!r}"
        lines = data[pos:end].decode("latin-1").split("\r\n")
        match = re.fullmatch(r"HTTP/1\.1 (\d{3}) .*", lines[0])
        assert match, f"bad status line {lines[0]!r}"
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        pos = end + 4
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body, pos = _chunked(data, pos)
        elif head and (pos == len(data) or data.startswith(b"HTTP/1.1 ", pos)):
            body = b""
        else:
            size = int(headers.get("content-length", "0"))
            body, pos = data[pos : pos + size], pos + size
            assert len(body) == size, f"truncated body: {body!r}"
        out.append(RawResponse(int(match[1]), headers, body))
    return out


def exchange(
    daemon: Daemon,
    via: str,
    data: bytes,
    *,
    half_close: bool = False,
    timeout: float = READ_TIMEOUT_S,
) -> tuple[list[RawResponse], bool]:
    """Send data on a fresh connection and read to close: (responses, closed by the daemon)."""
    with open_socket(daemon, via) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon answered and closed before taking everything: read the answer
        raw, closed = read_to_close(sock, timeout)
    assert b"Traceback" not in raw and b'File "' not in raw, raw[:2000]
    return parse_responses(raw), closed


def check_error(resp: RawResponse, status: int, code: str) -> dict[str, Any]:
    """An error answer: status, JSON {"error": {code, message}}; returns the error object."""
    assert resp.status == status, (resp.status, resp.body)
    assert resp.headers.get("content-type", "").startswith("application/json"), resp.headers
    err = resp.json()["error"]
    assert err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"], err
    return err  # type: ignore[no-any-return]


def post(path: str, body: bytes, headers: bytes = b"") -> bytes:
    """A POST with a Content-Length body and a loopback Host."""
    head = f"POST {path} HTTP/1.1\r\nContent-Length: {len(body)}\r\n".encode()
    return head + HOST + headers + b"\r\n" + body


def vm_rss_kb(pid: int) -> int:
    """A process's resident set size in KiB, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def daemon_alive(daemon: Daemon) -> None:
    """The process runs and answers on both listeners."""
    assert daemon.proc is not None and daemon.proc.poll() is None, log_tail(daemon)
    for via in ("unix", "tcp"):
        assert daemon.client(via).get("/healthz").status == 200
